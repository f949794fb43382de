"""``smse serve``: a web page and a JSON API that classify images and show similar reference cases."""

import ipaddress

from smse.serve.service import Limits, Service, Upload

__all__ = ["Limits", "Service", "Upload", "create_app", "is_loopback"]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.1``, ``::1``, ``[::1]``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def __getattr__(name: str):
    """``create_app`` on first use, so that the service imports without FastAPI installed."""
    if name == "create_app":
        from smse.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'smse.serve' has no attribute {name!r}")
