"""The web service over a gallery index (``cirlab serve``): FastAPI app, web page and JSON API (``[serve]`` extra)."""

from cirlab.serve.app import create_app

__all__ = ["create_app"]
