"""The REST frontend: a Falcon app, run under gunicorn, that reaches the models through the broker."""

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)
