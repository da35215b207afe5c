"""What became of one recipient's copy. Standard library only: the pipe's fast path reads it."""

import enum


class DeliveryStatus(enum.Enum):
    DELIVERED = "delivered"
    NO_SUCH_MAILBOX = "no such mailbox"
    MAILBOX_INACTIVE = "mailbox inactive"
    # An alias forwarding to addresses this server cannot store into: the MTA must expand it.
    OUTSIDE_DESTINATION = "alias forwards to outside addresses; expand aliases in the MTA"
    ALIAS_LOOP = "alias expansion loops or is too deep"
    OVER_QUOTA = "over quota"
    TOO_LARGE = "message too large"
    EMPTY_MESSAGE = "empty message"
    TEMPORARY_FAILURE = "temporary failure"
    # All-or-none delivery only: this recipient was fine, but another one failed.
    NOT_ATTEMPTED = "not delivered because another recipient failed"
