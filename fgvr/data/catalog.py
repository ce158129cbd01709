"""The standard benchmarks in one table: official totals, where each is fetched from (with the
checksums every download is verified against) and where data.root is once it is extracted.

A benchmark's key is its config name in configs/data/ and its data.format. Totals are the official
splits as the readers return them (Flowers: train + val; Aircraft: trainval; iNat2017: val as the test
split).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Archive:
    """One file of a data set. Saved as <root>/<into>/<filename> and, if it is a tar or zip
    archive, extracted there."""

    url: str | None  # None: it cannot be fetched automatically (see Benchmark.manual)
    checksums: tuple[str, ...]  # "md5:<hex>" or "sha256:<hex>": the file must match one of them
    into: str = ""  # folder under the download root
    filename: str = ""  # default: the URL's last part
    size: int | None = None  # bytes, where known

    @property
    def name(self) -> str:
        return self.filename or (self.url or "").rsplit("/", 1)[-1].split("?", 1)[0]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    classes: int
    train: int
    test: int
    folder: str  # data.root, relative to the download root
    archives: tuple[Archive, ...]
    boxes: bool  # the official files give object boxes
    manual: str = ""  # what the user has to do by hand before `fgvr data download` can finish
    level_classes: dict[str, int] = field(default_factory=dict)  # class counts at other label levels (data.level)
    reader: str = ""  # the reader of its files (fgvr/data/readers.py); default: its name

    def num_classes(self, level: str | None = None) -> int:
        return self.level_classes.get(level, self.classes) if level else self.classes


_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_DOGS = "http://vision.stanford.edu/aditya86/ImageNetDogs"
_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com/2017"

# Checksums: torchvision's md5s (Flowers, Pets), tensorflow-datasets' sha256s (Dogs, Aircraft),
# the ones in wide use in FGVC code (CUB, NABirds, Cars) and the iNat 2017 challenge's README.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("cub", "CUB-200-2011", 200, 5994, 5794, "CUB_200_2011", boxes=True, archives=(
        Archive("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                ("md5:97eceeb196236b17998738112f37df78",), size=1150585339),)),
    Benchmark("nabirds", "NABirds", 555, 23929, 24633, "nabirds", boxes=True, reader="cub", archives=(
        Archive(None, ("md5:df21a9e4db349a14e2b08adfd45873bd",), filename="nabirds.tar.gz"),),
        manual="Cornell hands NABirds out only after you accept its terms of use: fill in the form at "
               "https://dl.allaboutbirds.org/nabirds and download nabirds.tar.gz."),
    Benchmark("cars", "Stanford Cars", 196, 8144, 8041, "stanford_cars", boxes=True, archives=(
        Archive(None, ("md5:d5c8f0aa497503f355e17dc7886c3f14",), into="stanford_cars", filename="car_ims.tgz"),
        Archive(None, ("md5:b407c6086d669747186bd1d764ff9dbc",), into="stanford_cars", filename="cars_annos.mat")),
        manual="Stanford no longer serves Stanford Cars (http://ai.stanford.edu/~jkrause/car196/ is gone): get "
               "car_ims.tgz and cars_annos.mat from a copy you trust; the checksums tell whether it is the original."),
    Benchmark("aircraft", "FGVC-Aircraft 2013b", 100, 6667, 3333, "fgvc-aircraft-2013b", boxes=True,
              level_classes={"family": 70, "manufacturer": 30}, archives=(
        # Two sha256s are in circulation for this archive (tensorflow-datasets' and the one of the
        # file served today); either is accepted.
        Archive(f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                ("sha256:e4e323d410e29f0370c81eabdcbb0e2b813acea1de22891b70b58ff41bfc9834",
                 "sha256:d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75")),)),
    Benchmark("dogs", "Stanford Dogs", 120, 12000, 8580, "stanford_dogs", boxes=True, archives=(
        Archive(f"{_DOGS}/images.tar", ("sha256:a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",),
                into="stanford_dogs", size=793579520),
        Archive(f"{_DOGS}/annotation.tar",
                ("sha256:662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd",),
                into="stanford_dogs", size=21852160),
        Archive(f"{_DOGS}/lists.tar", ("sha256:34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",),
                into="stanford_dogs", size=481280))),
    Benchmark("flowers", "Oxford Flowers 102", 102, 2040, 6149, "flowers102", boxes=False, archives=(
        Archive(f"{_VGG}/flowers/102/102flowers.tgz", ("md5:52808999861908f626f3c1f4e79d11fa",), into="flowers102",
                size=344862509),
        Archive(f"{_VGG}/flowers/102/imagelabels.mat", ("md5:e0620be6f572b9609742df49c70aed4d",), into="flowers102",
                size=502),
        Archive(f"{_VGG}/flowers/102/setid.mat", ("md5:a5357ecc9cb78c4bef273ce3793fc85c",), into="flowers102",
                size=14989))),
    Benchmark("pets", "Oxford-IIIT Pets", 37, 3680, 3669, "oxford-iiit-pet", boxes=False, archives=(
        Archive(f"{_VGG}/pets/data/images.tar.gz", ("md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",), into="oxford-iiit-pet",
                size=791918971),
        Archive(f"{_VGG}/pets/data/annotations.tar.gz", ("md5:95a8c909bbe2e81eed6a22bccdf3f68f",),
                into="oxford-iiit-pet", size=19173078))),
    Benchmark("inat2017", "iNaturalist 2017", 5089, 579184, 95986, "inat2017", boxes=False, reader="inat", archives=(
        Archive(f"{_INAT}/train_val_images.tar.gz", ("md5:7c784ea5e424efaec655bd392f87301f",), into="inat2017",
                size=198765436676),
        Archive(f"{_INAT}/train_val2017.zip", ("md5:444c835f6459867ad69fcb36478786e7",), into="inat2017",
                size=26836398))),
)}
