"""The worker processes of the peers and of the floors, one module each, run as ``python -m``.

Every peer runs the same job (``common.sync_mentor``): read the mentor's row, PATCH the portal, write the outcome.
"""
