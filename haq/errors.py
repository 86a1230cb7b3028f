"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class HaqError(Exception):
    """A problem with the user's input or environment, with a message that says what to change."""


NOT_FINITE = ("the model's logits are NaN or infinite, so its weights hold NaN/Inf or overflow in their dtype: "
              "check the checkpoint (its float model evaluated the same way shows which)")


def validated(fn):
    """The Python API checks its arguments like the CLI does: a value of the wrong type (by the
    function's annotations, strictly: no silent coercion) is a HaqError naming the argument."""
    import functools
    import inspect

    from pydantic import ConfigDict, ValidationError, validate_call

    inner = validate_call(config=ConfigDict(arbitrary_types_allowed=True, strict=True))(fn)
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = err["loc"][0] if err["loc"] else None
            name = params[loc] if isinstance(loc, int) and loc < len(params) else loc
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            if err["type"].startswith("missing"):
                raise HaqError(f"{fn.__name__}(): missing argument {name}") from None
            if name in fn.__annotations__:
                raise HaqError(f"{fn.__name__}(): {name} must be {fn.__annotations__[name]}, got {got}") from None
            raise HaqError(f"{fn.__name__}(): {name or 'arguments'}: {err['msg'].lower()} (got {got})") from None

    return wrapper
