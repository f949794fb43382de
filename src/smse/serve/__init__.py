"""``smse serve``: a web page and a JSON API that classify images and show similar reference cases."""

from smse.serve.service import Limits, Service, Upload

__all__ = ["Limits", "Service", "Upload", "create_app"]


def __getattr__(name: str):
    """``create_app`` on first use, so that the service imports without FastAPI installed."""
    if name == "create_app":
        from smse.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'smse.serve' has no attribute {name!r}")
