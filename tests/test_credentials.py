"""Credentials never reach what is recorded; a git token joins the URL only to connect."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grace.credentials import has_credentials, redact_text, redact_url, redact_value, with_git_token


@pytest.mark.parametrize(
    "url,safe",
    [
        ("https://ghp_T0KEN@github.com/team/images.git", "https://***@github.com/team/images.git"),
        ("https://me:s3cret@git.example.com/a.git", "https://***@git.example.com/a.git"),
        ("http://user:pw@minio:9000", "http://***@minio:9000"),
        (
            "https://b.s3.amazonaws.com/x?X-Amz-Signature=abc&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/x?X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("https://mlflow.example.com/?token=abc", "https://mlflow.example.com/?token=***"),
    ],
)
def test_urls_lose_their_secrets(url, safe):
    assert redact_url(url) == safe and has_credentials(url)


@pytest.mark.parametrize(
    "clean",
    ["https://git.example.com/a.git", "s3://bucket/prefix", "sqlite:////tmp/m.db", "HEAD", ""],
)
def test_clean_values_are_unchanged(clean):
    assert redact_url(clean) == clean and not has_credentials(clean)


def test_urls_inside_text_and_nested_values_are_redacted():
    msg = "git fetch https://tok@git.example.com/a.git failed: denied"
    assert redact_text(msg) == "git fetch https://***@git.example.com/a.git failed: denied"
    nested = {"repo": ["https://u:p@h/x"], "n": 3, "s3": {"url": "http://k:s@m:9000"}}
    assert redact_value(nested) == {
        "repo": ["https://***@h/x"],
        "n": 3,
        "s3": {"url": "http://***@m:9000"},
    }


secret = st.text(string.ascii_letters + string.digits + "-._~", min_size=6, max_size=20)


@given(user=secret, password=secret, host=st.sampled_from(["git.example.com", "10.0.0.1:8443"]))
def test_a_redacted_url_holds_no_userinfo_and_is_stable(user, password, host):
    url = f"https://{user}:{password}@{host}/repo.git?ref=main"
    safe = redact_url(url)
    assert password not in safe and user not in safe.split("@")[0]
    assert redact_url(safe) == safe and safe.endswith(f"@{host}/repo.git?ref=main")


@given(st.text(max_size=60))
def test_redaction_never_raises_and_is_idempotent(text):
    assert redact_text(redact_text(text)) == redact_text(text)
    assert redact_url(redact_url(text)) == redact_url(text)


def test_git_token_joins_https_urls_only(monkeypatch):
    monkeypatch.delenv("GRACE_GIT_TOKEN", raising=False)
    assert with_git_token("https://git.example.com/a.git") == "https://git.example.com/a.git"
    monkeypatch.setenv("GRACE_GIT_TOKEN", "t/k:n")
    assert (
        with_git_token("https://git.example.com/a.git")
        == "https://git:t%2Fk%3An@git.example.com/a.git"
    )
    monkeypatch.setenv("GRACE_GIT_USERNAME", "oauth2")
    assert with_git_token("https://h/a.git").startswith("https://oauth2:")
    for unchanged in [
        "/srv/repo",
        "git@h:a.git",
        "ssh://h/a.git",
        "https://me@h/a.git",
        "http://h/a",
    ]:
        assert with_git_token(unchanged) == unchanged
