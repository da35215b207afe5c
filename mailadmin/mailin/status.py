"""What became of one recipient's copy. Standard library only: the pipe's fast path reads it."""

import enum


class DeliveryStatus(enum.Enum):
    DELIVERED = "delivered"
    NO_SUCH_MAILBOX = "no such mailbox"
    MAILBOX_INACTIVE = "mailbox inactive"
    OVER_QUOTA = "over quota"
    TOO_LARGE = "message too large"
    EMPTY_MESSAGE = "empty message"
    TEMPORARY_FAILURE = "temporary failure"
    # All-or-none delivery only: this recipient was fine, but another one failed.
    NOT_ATTEMPTED = "not delivered because another recipient failed"
