"""Feature-caching two-stage transfer learning.

images -> backbone -> feature store (HDF5) -> heads -> report
"""

__version__ = "0.1.0"
