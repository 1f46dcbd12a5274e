"""The service layer: what the API does, written once, between HTTP and the runtime.

Routers, the ASGI edge (api/edge.py) and the WebSocket parse a request into one parameter object
(``ActParams``, ``SessionStepParams``…), call a service here and serialise what it returns.
Limit checks live here, domain errors (``service.errors``) leave here; HTTP status codes are
chosen at the edge (``service.api.errors``).
"""
