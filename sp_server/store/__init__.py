"""The store: training set and labelling queue in one ase.db (SQLite file or PostgreSQL URL), with leases.

States: pending -> claimed (owner, lease_until, attempts) -> labeled | failed (reason, attempts) | excluded.
Every state change happens under a store-wide lock (an flock beside a SQLite database, an advisory lock on
PostgreSQL: both released by the kernel or the server when their process dies; ase.db's own lock file is never
used, see :mod:`.db`) and inside one transaction, so two workers never claim the same frame, a crashed worker's claims
expire and are retried, and a worker whose lease expired cannot label a frame someone else has claimed since.
"""
from .db import LockTimeout, connect
from .store import Store, StoreError

__all__ = ["LockTimeout", "Store", "StoreError", "connect"]
