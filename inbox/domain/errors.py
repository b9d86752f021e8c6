"""Errors a command raises when the state forbids it (the API answers 409 or 404)."""


class DomainError(Exception):
    """A command refused by an aggregate's rules."""


class ConversationStateError(DomainError):
    pass


class CustomerMergeError(DomainError):
    pass
