"""dm-thin metadata in the kernel's on-disk format: read, write, check, dump and restore."""

from .dump import device_runs, dump_json, dump_xml
from .ondisk import DeviceDetails, Superblock
from .pool import Lookup, ThinMetadata

__all__ = ["DeviceDetails", "Lookup", "Superblock", "ThinMetadata", "device_runs", "dump_json", "dump_xml"]
