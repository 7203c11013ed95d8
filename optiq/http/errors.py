"""The error every 4xx and 5xx carries, in the shape of the API it answers."""

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                   500: "api_error", 529: "overloaded_error"}


class ApiError(Exception):
    """An API error: OpenAI's shape {"error": {"message", "type", "param", "code"}} or Anthropic's."""

    def __init__(self, status: int, message: str, param=None, code=None, type="invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = tuple(headers)  # extra response headers (a 401's WWW-Authenticate)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
        kind = ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        named = self.param is None or self.message.startswith((self.param, f"'{self.param}'"))
        return {"type": "error", "error": {"type": kind, "message": self.message if named else f"{self.param}: {self.message}"}}
