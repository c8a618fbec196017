"""API room: how the services' routers become the application's routes.

Each service module declares its operations on `service_router()`. The application takes
their routes as they are (`add_routes`) rather than through FastAPI's include_router: since
FastAPI 0.16x an included router is matched through a layer of its own that re-derives its
candidates and juggles the scope for every route it tries, which cost a GET 0.2-0.3 ms before
its operation ran (bench/api.py, py-spy); plain routes are matched by their path regex alone.
What include_router would add is set here at declaration: the operationId (the handler's name)
and the route class that honours Idempotency-Key. The OpenAPI document is the same either way
(tests/test_event_contracts.py compares it with docs/openapi.json).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from mailflow.api.idempotency import IdempotentRoute


def operation_id(route: APIRoute) -> str:
    """An operation's id in the OpenAPI document: its handler's name (`get_campaign`)."""
    return route.name


def service_router(**kwargs: Any) -> APIRouter:
    return APIRouter(route_class=IdempotentRoute, generate_unique_id_function=operation_id, **kwargs)


def add_routes(api: FastAPI, routers: Iterable[APIRouter]) -> None:
    for router in routers:
        api.router.routes.extend(router.routes)
