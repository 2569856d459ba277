"""The task queue: tasks, the replica registry and the task-type catalogue (controller and worker)."""

from gpuscale.queue.tasks import (
    FINAL_STATUSES,
    NOTIFY_CHANNEL,
    BlockedRow,
    ClaimedTask,
    DocumentTaken,
    InvalidTask,
    NewTask,
    PoolStats,
    Priority,
    Queue,
    QueueError,
    RunningRow,
    ServerInfo,
    TaskStatus,
    WorkDetail,
    validate_task,
)

__all__ = [
    "FINAL_STATUSES",
    "NOTIFY_CHANNEL",
    "BlockedRow",
    "ClaimedTask",
    "DocumentTaken",
    "InvalidTask",
    "NewTask",
    "PoolStats",
    "Priority",
    "Queue",
    "QueueError",
    "RunningRow",
    "ServerInfo",
    "TaskStatus",
    "WorkDetail",
    "validate_task",
]
