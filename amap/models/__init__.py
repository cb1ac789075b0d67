"""The FLatten Transformer zoo, registered in timm's model registry.

Importing this package (or ``amap``) registers every model, so ``timm.create_model('flatten_swin_tiny')`` works.
"""
from . import flatten_cswin, flatten_deit, flatten_pvt, flatten_pvt_v2, flatten_swin  # noqa: F401  (registration)
from .official import from_official

__all__ = ['from_official']
