"""The browser gateway (``cbmir gateway``): HTTP/JSON and the similar-cases panel over the gRPC API.

A stateless translator. Each HTTP request becomes one call of ``cbmir.v1.SimilarCases`` on the query
service, with the caller's ``Authorization`` header passed on as gRPC metadata: the query service
checks tokens and roles exactly as for its gRPC callers; the gateway holds no token of its own.

* :mod:`services.gateway.app`: the FastAPI application (endpoints, body budget, security headers);
* :mod:`services.gateway.api`: the JSON shapes and their translation to and from protobuf;
* :mod:`services.gateway.errors`: the one table from failures to HTTP statuses;
* :mod:`services.gateway.upstream`: the gRPC channel to the query service;
* :mod:`services.gateway.server`: ``cbmir gateway`` (uvicorn on a socket it binds itself);
* ``static/``: the panel (plain HTML, JS and CSS; no external resources).
"""
