#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, with accounting, for tests:
# munged + MariaDB + slurmdbd + slurmctld + slurmd, every config/state/log/PID file under DIR.
#   scripts/slurm_cluster.sh start  [DIR]   # last line printed: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_cluster.sh stop   [DIR]   # cancels the jobs, then stops the daemons by their PID files
#   scripts/slurm_cluster.sh status [DIR]   # exit 0 iff the cluster in DIR is up
# DIR defaults to ${FGVR_SLURM_DIR:-/tmp/fgvr-slurm}; `source DIR/env` points the clients at it.
# Ports on 127.0.0.1 (override when they clash): FGVR_SLURMCTLD_PORT (16817), FGVR_SLURMD_PORT (16818),
# FGVR_SLURMDBD_PORT (16819), FGVR_SLURM_DB_PORT (16306, MariaDB).
# Needs root (apt, and SlurmUser=root) and Debian's Slurm 22.05 packages, which `start` installs if missing.
# `start` on a used DIR keeps its state (munge key, database, slurmctld state: job IDs go on) and
# restarts the daemons; on a cluster that is up it changes nothing, so a changed port or setting
# needs `stop` first. `stop; rm -rf DIR` resets everything (job IDs start at 1 again).
set -euo pipefail

readonly PACKAGES=(slurmd slurmctld slurm-client munge slurmdbd mariadb-server)
readonly DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs it backwards
readonly CLUSTER=fgvr NODE=localhost PARTITION=debug
CTLD_PORT=${FGVR_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${FGVR_SLURMD_PORT:-16818}
DBD_PORT=${FGVR_SLURMDBD_PORT:-16819}
DB_PORT=${FGVR_SLURM_DB_PORT:-16306}
# How long each daemon may take to become ready, in seconds.
READY_TIMEOUT=${FGVR_SLURM_READY_TIMEOUT:-60}

usage() {
  echo "usage: $0 {start|stop|status} [DIR]   (DIR default: \${FGVR_SLURM_DIR:-/tmp/fgvr-slurm})" >&2
  exit 2
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
CMD=$1
DIR=${2:-${FGVR_SLURM_DIR:-/tmp/fgvr-slurm}}
DIR=$(realpath -m -- "$DIR")  # absolute: the paths are written into config files
RUN=$DIR/run LOG=$DIR/log
CONF=$DIR/slurm.conf DBD_CONF=$DIR/slurmdbd.conf
MUNGE_DIR=$DIR/munge MUNGE_SOCKET=$DIR/munge/munged.sock
DB_DATA=$DIR/mysql/data DB_SOCKET=$DIR/mysql/mysqld.sock
# Every Slurm client (sinfo, sbatch, sacct, submitit's calls) reads this; so does slurmdbd, which
# has no -f option and looks for slurmdbd.conf next to SLURM_CONF.
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*"; }
STARTED=()      # daemons this `start` launched, stopped again if it fails
FAILED_MSG=""   # set by fail(); the EXIT trap of start prints it

# fail MESSAGE: give up on `start` with a one-line reason on stderr (the EXIT trap stops what started).
fail() {
  FAILED_MSG=$1
  exit 1
}

pidfile() { echo "$RUN/$1.pid"; }

# pid_of NAME: the PID in NAME's PID file, if that process is alive and really is NAME (guards
# against a stale PID file whose number was reused); empty otherwise.
pid_of() {
  local name=$1 pid state
  pid=$(cat "$(pidfile "$name")" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  # A zombie (exited, not yet reaped) counts as gone.
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [ "$state" != Z ] || return 0
  echo "$pid"
}

# launch NAME CONSOLE CMD...: run a daemon in its foreground mode (-D / --foreground, so $! is the
# daemon itself and no double fork hides it), in a session of its own (setsid: detached from the
# caller's terminal and job control; its helpers stay in that session, which `stop` uses), its
# stdout/stderr appended to the file CONSOLE, its PID written to DIR/run/NAME.pid.
launch() {
  local name=$1 console=$2
  shift 2
  setsid "$@" >>"$console" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
  STARTED+=("$name")
}

# wait_ready NAME CHECK...: poll CHECK until it succeeds; fail if NAME exits or READY_TIMEOUT passes.
wait_ready() {
  local name=$1 deadline=$((SECONDS + READY_TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    [ -n "$(pid_of "$name")" ] || fail "$name exited during start-up; see $(logs_of "$name")"
    [ $SECONDS -lt $deadline ] || fail "$name not ready after ${READY_TIMEOUT}s; see $(logs_of "$name")"
    sleep 0.3
  done
}

# The Slurm daemons log to DIR/log/NAME.log themselves (with timestamps) and, in the foreground,
# echo that to stderr, which goes to NAME.out: that file only matters when a daemon dies before
# its log is open (e.g. a config error). munged and mariadbd have one log each.
logs_of() {
  case $1 in
    slurm*) echo "$LOG/$1.log (and $LOG/$1.out)" ;;
    *) echo "$LOG/$1.log" ;;
  esac
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------- packages

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_packages() {
  local p missing=() policy=/usr/sbin/policy-rc.d made_policy=0
  for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]} (log: $LOG/apt.log)"
  # The packages' postinst scripts would start system-wide munge/MariaDB/Slurm services; this
  # cluster runs its own, so forbid that for the duration of the install (exit 101 = "not allowed").
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && made_policy=1
  fi
  local apt=(apt-get install -y -q --no-install-recommends "${missing[@]}") ok=1
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the package lists are missing or stale (the install fails).
  if ! "${apt[@]}" >>"$LOG/apt.log" 2>&1; then
    if ! { apt-get update -q && "${apt[@]}"; } >>"$LOG/apt.log" 2>&1; then ok=0; fi
  fi
  [ $made_policy = 0 ] || rm -f $policy
  [ $ok = 1 ] || fail "apt-get install ${missing[*]} failed; see $LOG/apt.log"
}

# ------------------------------------------------------------------------------------------- munge

munge_ok() { munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET"; }

start_munged() {
  # The directory holding the socket must be 755: munged refuses a group/world-writable one, and
  # clients must be able to reach the socket. The key must be readable by its owner only.
  mkdir -p "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
  fi
  chmod 400 "$MUNGE_DIR/munge.key"
  # --force: warn instead of refusing when a directory above DIR is group/world-writable without
  # the sticky bit (e.g. DIR inside a shared folder). A stale socket of a killed munged is fine.
  # In the foreground munged logs to stderr only (--log-file is ignored), hence the console file.
  launch munged "$LOG/munged.log" munged --foreground --force \
    --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" --seed-file="$MUNGE_DIR/munged.seed" \
    --pid-file="$(pidfile munged)"
  wait_ready munged munge_ok
}

# ----------------------------------------------------------------------------------------- MariaDB

db() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot "$@"; }

start_mariadbd() {
  mkdir -p "$DIR/mysql"
  if [ ! -d "$DB_DATA/mysql" ]; then
    rm -rf "$DB_DATA"
    # --no-defaults everywhere: /etc/mysql's config (system socket, port 3306, datadir) must not apply.
    mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" --skip-test-db \
      --auth-root-authentication-method=socket >>"$LOG/mariadbd.log" 2>&1 ||
      fail "mariadb-install-db failed; see $LOG/mariadbd.log"
  fi
  # --user=root: mariadbd refuses to run as root otherwise. TCP on 127.0.0.1 only, because slurmdbd
  # has no option for a Unix socket path (its "localhost" would mean the system socket).
  # --skip-name-resolve: the slurm user is granted on the address 127.0.0.1, no DNS involved.
  # innodb_lock_wait_timeout=900 is what slurmdbd asks for. It also logs "Database settings not
  # recommended values: innodb_buffer_pool_size" (it wants GiBs); harmless for a test database.
  launch mariadbd "$LOG/mariadbd.log" mariadbd --no-defaults --user=root --datadir="$DB_DATA" \
    --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$(pidfile mariadbd)" --log-error="$LOG/mariadbd.log" \
    --innodb-lock-wait-timeout=900
  wait_ready mariadbd db -e 'SELECT 1'
  # A fresh password each start (it only lives in slurmdbd.conf, mode 600).
  DB_PASS=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  db --batch >>"$LOG/mariadbd.log" 2>&1 <<SQL || fail "creating the slurm database user failed; see $LOG/mariadbd.log"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

# ---------------------------------------------------------------------------------------- slurmdbd

sacctmgr_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
  (
    umask 077  # slurmdbd refuses a slurmdbd.conf readable by others (it holds the DB password)
    cat >"$DBD_CONF" <<EOF
# Written by scripts/slurm_cluster.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
$(comm_params)
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$(pidfile slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DBD_CONF"
  launch slurmdbd "$LOG/slurmdbd.out" slurmdbd -D
  wait_ready slurmdbd sacctmgr_ok
  # Register the cluster before slurmctld starts, so its first connection is accepted. Adding it
  # also creates the account "root" and root's association, which accounting hangs jobs on.
  if ! sacctmgr_ok | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >>"$LOG/slurmdbd.log" 2>&1 ||
      fail "sacctmgr add cluster $CLUSTER failed; see $LOG/slurmdbd.log"
  fi
}

# --------------------------------------------------------------------------------------- slurmctld

# Slurm daemons listen on INADDR_ANY unless told NoInAddrAny (NoCtldInAddrAny for slurmctld), and
# then on the address the *hostname* resolves to, not on the configured host. So ask for it only
# when the hostname resolves to 127.0.0.1, the address everything here talks to; otherwise the
# daemons would be unreachable, and they stay on INADDR_ANY.
comm_params() {
  if [ "$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 {print $1}')" = 127.0.0.1 ]; then
    echo "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  else
    echo "# (listening on all addresses: $(hostname) does not resolve to 127.0.0.1)"
  fi
}

write_slurm_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # Leave ~10% of the RAM unclaimed: slurmd drains a node whose RealMemory exceeds what it finds.
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  : >"$DIR/plugstack.conf"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh; rewritten on every start. A one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
$(comm_params)
# Root runs everything: no slurm system user needed, and jobs run as the submitting user anyway.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job may not start again before its old launch credential expires; the
# default of 120 s makes every requeue in a test wait two minutes.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=30

StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No mail from this cluster (slurmctld logs an error when the default /bin/mail is missing).
MailProg=/bin/true
# Keep /etc/slurm's SPANK plugins (if any) out of this cluster.
PlugStackConfig=$DIR/plugstack.conf

# No cgroups (none to manage in a container): processes are tracked through their parent PIDs.
ProctrackType=proctrack/linuxproc
# task/affinity pins each job to the cores it was given; with task/none two single-core torch
# jobs each spread threads over both cores and run ~10x slower.
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none

# A node that was DOWN (e.g. slurmd killed by a previous stop) rejoins as soon as slurmd registers.
ReturnToService=2
# Jobs may be requeued (scontrol requeue, also array tasks; submitit requeues on preemption).
JobRequeue=1
# Seconds between SIGTERM and SIGKILL at time limit / scancel (default 30): faster test teardown.
KillWait=5
# Jobs held by time (a requeued job's BeginTime, sbatch --begin) start only at the next scheduling
# pass, by default up to 30 s (backfill) / 60 s (main loop) later; on one node frequent passes cost
# nothing.
SchedulerParameters=bf_interval=5,sched_interval=10
# Finished jobs leave slurmctld's memory after 60 s (default 300); sacct keeps them for good.
MinJobAge=60

# Accounting through slurmdbd: a job that dies without reporting (e.g. SIGKILL) then shows up as
# FAILED/CANCELLED in sacct, which submitit polls, instead of vanishing from squeue unexplained.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd ignore AuthInfo; they take the munge socket from here.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

# NodeName matches slurmd -N $NODE (the real hostname is something else).
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
  mkdir -p "$DIR/state/slurmctld"
  launch slurmctld "$LOG/slurmctld.out" slurmctld -D -f "$CONF"
  wait_ready slurmctld ctld_ok
}

# ------------------------------------------------------------------------------------------ slurmd

# The node is up and in service: idle, or running jobs. Not down/drained/"not responding" (*).
node_ok() { sinfo -h -N -n "$NODE" -o %T | grep -Eqx 'idle|mixed|allocated|completing'; }

start_slurmd() {
  mkdir -p "$DIR/state/slurmd"
  launch slurmd "$LOG/slurmd.out" slurmd -D -N "$NODE" -f "$CONF"
  wait_ready slurmd node_ok
}

# ------------------------------------------------------------------------------------------- start

# Every daemon alive and slurmctld answering with the node in service.
cluster_up() {
  local d
  for d in "${DAEMONS[@]}"; do [ -n "$(pid_of "$d")" ] || return 1; done
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' && node_ok 2>/dev/null
}

on_start_exit() {
  local rc=$? i
  [ $rc -ne 0 ] || return 0
  echo "slurm_cluster: start failed: ${FAILED_MSG:-unexpected error (exit $rc)}" >&2
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_daemon "${STARTED[i]}" >/dev/null 2>&1 || true; done
  exit $rc
}

do_start() {
  [ "$(id -u)" = 0 ] || { echo "slurm_cluster: start needs root (apt, SlurmUser=root)" >&2; exit 1; }
  mkdir -p "$DIR" "$RUN" "$LOG"
  chmod 755 "$DIR"
  trap on_start_exit EXIT
  if cluster_up; then
    say "already up in $DIR"
  else
    local d p running=()
    for d in "${DAEMONS[@]}"; do [ -z "$(pid_of "$d")" ] || running+=("$d"); done
    if [ ${#running[@]} -gt 0 ]; then
      say "partly up (${running[*]}); restarting"
      do_stop >/dev/null
    fi
    for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
      port_free "$p" || fail "port $p on 127.0.0.1 is in use (set FGVR_SLURMCTLD_PORT, FGVR_SLURMD_PORT, FGVR_SLURMDBD_PORT, FGVR_SLURM_DB_PORT)"
    done
    install_packages
    write_slurm_conf
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # Adding the cluster normally creates root's association; make sure of it so jobs are accepted.
    if [ -z "$(sacctmgr -n -P show assoc where cluster="$CLUSTER" user=root format=user)" ]; then
      sacctmgr -i add user root account=root cluster="$CLUSTER" >>"$LOG/slurmdbd.log" 2>&1 ||
        fail "sacctmgr add user root failed; see $LOG/slurmdbd.log"
    fi
    say "up in $DIR (logs: $LOG)"
  fi
  trap - EXIT
  echo "export SLURM_CONF=$CONF" >"$DIR/env"
  echo "export SLURM_CONF=$CONF"
}

# -------------------------------------------------------------------------------------------- stop

# session_pids SID: the processes of session SID (a daemon's helpers, e.g. slurmctld's
# slurmscriptd; or a job step: its slurmstepd and the job's processes).
session_pids() {
  local sid=$1 f rest pid
  for f in /proc/[0-9]*/stat; do
    rest=$(cat "$f" 2>/dev/null) || continue
    pid=${f#/proc/}
    pid=${pid%/stat}
    rest=${rest##*) }  # after "pid (comm) ": state ppid pgrp session ...
    # shellcheck disable=SC2086
    set -- $rest
    if [ "${4:-}" = "$sid" ]; then echo "$pid"; fi
  done
}

# stop_daemon NAME: SIGTERM the PID in NAME's PID file, wait up to 20 s, then SIGKILL; then SIGKILL
# whatever is left in the session it led (launch made each daemon a session leader).
stop_daemon() {
  local name=$1 pid i
  pid=$(pid_of "$name")
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [ -n "$(pid_of "$name")" ] || break
      sleep 0.2
    done
    if [ -n "$(pid_of "$name")" ]; then
      say "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    local left
    left=$(session_pids "$pid")
    # shellcheck disable=SC2086
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    say "stopped $name (pid $pid)"
  fi
  rm -f "$(pidfile "$name")"
}

# step_sessions: the sessions of this cluster's job steps. Each slurmstepd (one per step, batch
# script included) leads a session of its own with the step's processes, outside slurmd's; it
# inherits slurmd's environment, so SLURM_CONF=DIR/slurm.conf tells this cluster's apart.
step_sessions() {
  local f pid rest
  for f in /proc/[0-9]*/comm; do
    [ "$(cat "$f" 2>/dev/null)" = slurmstepd ] || continue
    pid=${f#/proc/}
    pid=${pid%/comm}
    grep -qzxF "SLURM_CONF=$CONF" "/proc/$pid/environ" 2>/dev/null || continue
    rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${rest##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo "$4"
  done | sort -u
}

do_stop() {
  local i jobs sid left
  [ -d "$RUN" ] || { say "nothing to stop in $DIR"; return 0; }
  # Cancel the jobs first, while slurmctld and slurmd still run: their processes end cleanly and
  # accounting records them as CANCELLED instead of leaving them RUNNING forever.
  if [ -n "$(pid_of slurmctld)" ] && [ -n "$(pid_of slurmd)" ]; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || jobs=""
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 60; i++)); do  # KillWait=5 plus the epilogue: normally a few seconds
        [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] || break
        sleep 0.5
      done
    fi
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
  # Steps that outlived the cancel (slurmctld was down, or the cancel timed out) would run on
  # without a cluster: SIGKILL their sessions.
  for sid in $(step_sessions); do
    left=$(session_pids "$sid")
    # shellcheck disable=SC2086
    [ -z "$left" ] || { kill -KILL $left 2>/dev/null || true; say "killed leftover job step processes: ${left//$'\n'/ }"; }
  done
}

# ------------------------------------------------------------------------------------------ status

do_status() {
  local d pid up=0
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    if [ -n "$pid" ]; then printf '%-10s up (pid %s)\n' "$d" "$pid"; else printf '%-10s down\n' "$d"; fi
  done
  if [ -d "$DIR" ] && cluster_up; then
    say "up in $DIR; export SLURM_CONF=$CONF"
  else
    say "not up in $DIR"
    up=1
  fi
  return $up
}

case $CMD in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac
