"""Models: a timm backbone, the region methods and a head, composed in model.py."""
