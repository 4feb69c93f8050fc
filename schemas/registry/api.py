"""The Confluent Schema Registry REST contract: content types, error codes, versions.

Error codes are Confluent's (docs: "Schema Registry API Reference", Errors). Both the
embedded service and the client raise `RegistryError(status, error_code)` built here, so
a caller handles an error from Confluent, Karapace or the embedded registry the same way.
"""

from __future__ import annotations

from edgeloop.core.errors import RegistryError

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
SUBJECT_SOFT_DELETED = 40404
SUBJECT_NOT_SOFT_DELETED = 40405
SCHEMA_VERSION_SOFT_DELETED = 40406
SCHEMA_VERSION_NOT_SOFT_DELETED = 40407
SUBJECT_COMPATIBILITY_NOT_CONFIGURED = 40408
INCOMPATIBLE_SCHEMA = 409
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INVALID_COMPATIBILITY_LEVEL = 42203
BACKEND_STORE_ERROR = 50001
OPERATION_TIMED_OUT = 50002

# Versions are 1..2^31-1; -1 and "latest" name the latest live version.
MAX_VERSION = 2**31 - 1
LATEST = -1


def subject_not_found(subject: str) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' not found.", status=404, error_code=SUBJECT_NOT_FOUND
    )


def version_not_found(subject: str, version: int | str) -> RegistryError:
    return RegistryError(
        f"Version {version} not found for subject '{subject}'.",
        status=404,
        error_code=VERSION_NOT_FOUND,
    )


def schema_not_found(detail: str = "Schema not found") -> RegistryError:
    return RegistryError(detail, status=404, error_code=SCHEMA_NOT_FOUND)


def subject_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently",
        status=404,
        error_code=SUBJECT_SOFT_DELETED,
    )


def subject_not_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' was not deleted first before being permanently deleted",
        status=404,
        error_code=SUBJECT_NOT_SOFT_DELETED,
    )


def version_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' Version {version} was soft deleted. "
        "Set permanent=true to delete permanently",
        status=404,
        error_code=SCHEMA_VERSION_SOFT_DELETED,
    )


def version_not_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' Version {version} was not deleted first before being "
        "permanently deleted",
        status=404,
        error_code=SCHEMA_VERSION_NOT_SOFT_DELETED,
    )


def compatibility_not_configured(subject: str) -> RegistryError:
    return RegistryError(
        f"Subject '{subject}' does not have subject-level compatibility configured",
        status=404,
        error_code=SUBJECT_COMPATIBILITY_NOT_CONFIGURED,
    )


def incompatible(subject: str, details: list[str]) -> RegistryError:
    listed = "; ".join(details)
    return RegistryError(
        f"Schema being registered is incompatible with an earlier schema for subject "
        f"'{subject}', details: [{listed}]",
        status=409,
        error_code=INCOMPATIBLE_SCHEMA,
    )


def invalid_schema(detail: str) -> RegistryError:
    return RegistryError(f"Invalid schema: {detail}", status=422, error_code=INVALID_SCHEMA)


def invalid_version(version: str) -> RegistryError:
    return RegistryError(
        f"The specified version '{version}' is not a valid version id. Allowed values are "
        f'between [1, {MAX_VERSION}] and the string "latest"',
        status=422,
        error_code=INVALID_VERSION,
    )


def invalid_compatibility(level: object) -> RegistryError:
    return RegistryError(
        f"Invalid compatibility level: {level!r}",
        status=422,
        error_code=INVALID_COMPATIBILITY_LEVEL,
    )


def store_error(detail: str) -> RegistryError:
    return RegistryError(
        f"Error in the backend data store: {detail}", status=500, error_code=BACKEND_STORE_ERROR
    )


def timed_out(detail: str) -> RegistryError:
    return RegistryError(
        f"Operation timed out: {detail}", status=500, error_code=OPERATION_TIMED_OUT
    )


def parse_version(text: str) -> int:
    """`"latest"`/`"-1"` -> LATEST, `"3"` -> 3; anything else is error 42202."""
    if text == "latest":
        return LATEST
    try:
        version = int(text)
    except ValueError:
        raise invalid_version(text) from None
    if version == LATEST or 1 <= version <= MAX_VERSION:
        return version
    raise invalid_version(text)
