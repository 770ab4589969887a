"""Keys and packages shared by the adapters tests (keys are session-scoped: generation is
cheap but the tamper tests open thousands of variants of one package)."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.keys import (
    RecipientPrivateKey,
    SigningPrivateKey,
    generate_recipient_key,
    generate_signing_key,
)
from adapters.package import pack

from .builders import SMOLLM2_2L, small_adapter_dir


@pytest.fixture(scope="session")
def signer_a() -> SigningPrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="session")
def signer_b() -> SigningPrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="session")
def recipient() -> RecipientPrivateKey:
    return generate_recipient_key()


@pytest.fixture(scope="session")
def other_recipient() -> RecipientPrivateKey:
    return generate_recipient_key()


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_adapter_dir(tmp_path_factory.mktemp("small") / "adapter")


@pytest.fixture(scope="session")
def small_package(small_dir: Path, signer_a: SigningPrivateKey,
                  recipient: RecipientPrivateKey) -> bytes:
    return pack(small_dir, tenant="tenant-a", name="support-bot", version="1.0.0",
                base_model=SMOLLM2_2L.model_id, signer=signer_a,
                recipient=recipient.public_key(), created=1_700_000_000)
