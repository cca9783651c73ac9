"""The one error conversions raise: what is wrong and where (exit code 3, bad input)."""


class ConvertError(RuntimeError):
    pass
