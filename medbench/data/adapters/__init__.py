"""Dataset adapters: one module per dataset layout, each exposing ``ADAPTER``.

The adapter named ``foo-bar`` lives in ``foo_bar.py``; adding a layout is
adding a module here (see docs/architecture.md).
"""
