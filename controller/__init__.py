"""gpuscale controller: the PostgreSQL task queue, the scaling policy, the providers and the control loop.

Shared pieces that the worker also uses (settings, the database connection, the queue and the task
type registry) live here too, because the worker image installs the whole distribution anyway.
"""

__version__ = "0.1.0"
