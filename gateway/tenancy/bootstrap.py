"""First-start setup: the operator credential, the ``default`` tenant's fixed key from
settings, and in development mode a demo tenant with a key, a signing key pair, the three
trained demo adapters (``demo/``: ``demo-support``, ``demo-legal``, ``demo-json``) packed as
TSSP and uploaded through the normal upload path, and an expert table over them, so ``model:
"auto"`` works from the first start.

Keys are shown once, so the demo key and the admin key are also written to 0600 files in the
data directory; the development banner prints them (stdout only, never the logs).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from adapters.keys import generate_signing_key, load_signing_private, save_signing_key
from adapters.package import pack
from adapters.peft import read_peft_dir
from router import ExpertTable

from .auth import write_secret_file
from .demo import ADAPTERS as DEMO_ADAPTERS
from .demo import adapter_dir
from .service import Tenancy

log = logging.getLogger("tensafe.gateway")
ACTOR = "bootstrap"
DEMO_TENANT = "demo"


def demo_experts(base_model: str) -> dict:
    """The demo tenant's expert table: support questions to demo-support, legal ones to
    demo-legal, requests for JSON to demo-json, the rest to the base model."""
    def kw(*words: str) -> list[dict]:
        return [{"pattern": w, "weight": 2.0} for w in words]

    return ExpertTable.from_dict({"default": "general", "experts": [
        {"name": "support", "adapter": "demo-support", "description": "Customer support: accounts, orders, refunds.",
         "keywords": kw("password", "refund", "account", "order"),
         "examples": ["I forgot my password", "Where is my order?", "How do I get a refund?"]},
        {"name": "legal", "adapter": "demo-legal", "description": "Contracts, law and legal questions.",
         "keywords": kw("contract", "legal", "lawyer", "liability"),
         "examples": ["Is a verbal contract binding?", "What does limited liability mean?"]},
        {"name": "json", "adapter": "demo-json", "description": "Answers as a JSON object.",
         "keywords": kw("json"), "examples": ["Answer in JSON: what is the capital of Spain?"]},
        {"name": "general", "adapter": base_model, "description": "Everything else.", "keywords": [],
         "examples": ["What is the capital of France?", "Give me tips for sleeping better"]},
    ]}).to_dict()


@dataclasses.dataclass(frozen=True)
class Bootstrapped:
    admin_key_file: Path | None
    demo_key: str | None = None
    demo_key_file: Path | None = None
    demo_models: tuple[str, ...] = ()


async def ensure_admin_key(tenancy: Tenancy, data_dir: Path) -> tuple[str, Path]:
    """The bootstrap operator key when none is configured: created once, kept in a 0600 file."""
    path = data_dir / "admin-api-key"
    if path.exists():
        return path.read_text().strip(), path
    key, _ = await tenancy.issue_key(ACTOR, None, ("admin",), "bootstrap admin")
    write_secret_file(path, key)
    return key, path


async def ensure_default_tenant_key(tenancy: Tenancy, key: str) -> None:
    """Register the fixed ``api_key`` setting for the tenant ``default`` (idempotent)."""
    if await tenancy.store.api_key_by_digest(tenancy.auth.digest(key)) is not None:
        return
    if await tenancy.store.get_tenant("default") is None:
        await tenancy.create_tenant(ACTOR, "default", "Default tenant", {})
    await tenancy.issue_key(ACTOR, "default", ("tenant", "tenant-admin"), "from settings", key=key)


async def ensure_demo(tenancy: Tenancy, data_dir: Path, model_name: str) -> tuple[str, Path, tuple[str, ...]]:
    key_file = data_dir / "demo-api-key"
    signer_dir = data_dir / "demo-signing-key"
    if await tenancy.store.get_tenant(DEMO_TENANT) is None:
        await tenancy.create_tenant(ACTOR, DEMO_TENANT, "Demo tenant", {})
        key, _ = await tenancy.issue_key(ACTOR, DEMO_TENANT, ("tenant", "tenant-admin"), "demo")
        write_secret_file(key_file, key)
        signer = load_signing_private(signer_dir) if signer_dir.exists() else generate_signing_key()
        if not signer_dir.exists():
            save_signing_key(signer_dir, signer)
        pems = signer.public_key().to_pems()
        await tenancy.register_signing_key(ACTOR, DEMO_TENANT, {k: v.decode() for k, v in pems.items()})
        if tenancy.base_model is not None:
            recipient = tenancy.keys.recipient_keys()[-1].private.public_key()
            for name in DEMO_ADAPTERS:
                data = pack(read_peft_dir(adapter_dir(name)), tenant=DEMO_TENANT, name=name, version="1",
                            base_model=tenancy.base_model.model_id, signer=signer, recipient=recipient)
                await tenancy.upload(ACTOR, DEMO_TENANT, data)
        log.info("demo tenant created (key in %s)", key_file)
    names = tuple(a.name for a in await tenancy.store.list_adapters(DEMO_TENANT))
    if set(DEMO_ADAPTERS) <= set(names) and await tenancy.store.get_experts(DEMO_TENANT) is None:
        await tenancy.store.put_experts(DEMO_TENANT, demo_experts(model_name))
    return key_file.read_text().strip() if key_file.exists() else "", key_file, names
