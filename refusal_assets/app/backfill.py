"""Launch a real asset backfill on a running instance through the webserver's GraphQL API
(``launchPartitionBackfill``): there is no ``dagster asset backfill`` command."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

MUTATION = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
  }
}
"""


class BackfillError(RuntimeError):
    pass


SAE_SCOPE = "all"  # defs.partitions.SAE_SCOPE (not imported: this module stays free of Dagster)


def normalize_partitions(keys: list[str], partitions: list[str]) -> list[str]:
    """``sae`` is partitioned site x scope, so its keys read ``all|<site key>``; when ``sae`` is the
    only selected asset, a bare site key is accepted and completed. Other assets' keys (and
    ``sae`` keys already in ``scope|site`` form) pass unchanged."""
    if keys != ["sae"]:
        return partitions
    return [p if "|" in p else f"{SAE_SCOPE}|{p}" for p in partitions]


def backfill_params(select: str, partitions: list[str] | None) -> dict:
    keys = [k.strip() for k in select.split(",") if k.strip()]
    if not keys:
        raise BackfillError("--select names no asset")
    if partitions:
        partitions = normalize_partitions(keys, partitions)
    params: dict = {
        "assetSelection": [{"path": k.split("/")} for k in keys],
        "title": f"refusal-assets backfill {select}",
    }
    if partitions:
        params["partitionNames"] = partitions
    else:
        params["allPartitions"] = True
    return params


def partitions_by_assets_params(
    ranges: dict[str, list[tuple[str, str]] | None], title: str
) -> dict:
    """Backfill params naming, per asset (``"a/b"`` keys), its partition ranges, or None for an
    unpartitioned asset: each asset gets its own partitions, which ``partitionNames`` (one list
    for every selected asset) cannot say."""
    if not ranges:
        raise BackfillError("nothing to backfill")
    return {
        "partitionsByAssets": [
            {
                "assetKey": {"path": key.split("/")},
                "partitions": None
                if key_ranges is None
                else {"ranges": [{"start": first, "end": last} for first, last in key_ranges]},
            }
            for key, key_ranges in ranges.items()
        ],
        "title": title,
    }


def launch_partitions_backfill(
    url: str, ranges: dict[str, list[tuple[str, str]] | None], title: str, timeout: float = 60
) -> str:
    return _launch(url, partitions_by_assets_params(ranges, title), timeout)


def launch_backfill(
    url: str, select: str, partitions: list[str] | None = None, timeout: float = 60
) -> str:
    return _launch(url, backfill_params(select, partitions), timeout)


def _launch(url: str, params: dict, timeout: float) -> str:
    body = json.dumps({"query": MUTATION, "variables": {"params": params}}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:  # reached, but it refused the request: say what it said
        detail = e.read()[:1000].decode(errors="replace")
        raise BackfillError(f"the webserver at {url} answered HTTP {e.code}: {detail}") from e
    except urllib.error.URLError as e:
        raise BackfillError(
            f"cannot reach the Dagster webserver at {url} ({e.reason}); start it with `refusal-assets ui`"
        ) from e
    if payload.get("errors"):
        raise BackfillError(f"GraphQL error: {payload['errors'][0].get('message')}")
    result = payload["data"]["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(f"{result['__typename']}: {result.get('message', '')}")
    return result["backfillId"]
