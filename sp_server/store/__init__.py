"""The store: training set and labelling queue in one ase.db (SQLite file or PostgreSQL URL), with leases.

States: pending -> claimed (owner, lease_until, attempts) -> labeled | failed (reason, attempts) | excluded.
Every state change happens under a store-wide lock (a lock file beside a SQLite database, an advisory lock on
PostgreSQL) and inside one transaction, so two workers never claim the same frame, a crashed worker's claims
expire and are retried, and a worker whose lease expired cannot label a frame someone else has claimed since.
"""
from .store import Store, StoreError

__all__ = ["Store", "StoreError"]
