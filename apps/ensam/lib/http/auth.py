"""Bearer-token check for MONAI Label's authentication mode (``MONAI_LABEL_AUTH_ENABLE=true``).

monailabel 0.8.5 calls ``jwt.decode`` without ``algorithms`` (PyJWT 2 refuses every token), fetches the realm's key
on every request, and runs the check in an ``async`` dependency, i.e. on the event loop. ensam's check:

* **keys**: the realm document's ``public_key`` (Keycloak), else the JWKS named by the realm's OpenID configuration
  (``jwks_uri``). The key set is fetched once and kept for ``ENSAM_AUTH_KEYS_TTL_S`` seconds (default 300); a token
  whose ``kid`` is unknown refreshes it at most once per ``ENSAM_AUTH_KEYS_REFRESH_S`` seconds (default 30), so a
  flood of made-up ``kid`` values costs the realm nothing (key rotation still works within that delay). A realm
  that does not answer is not asked again for ``ENSAM_AUTH_KEYS_REFRESH_S`` seconds (the tokens are refused meanwhile).
* **algorithms**: asymmetric only (RS*/PS*/ES*/EdDSA); never ``none`` nor an HS* token signed with the public key;
  the key must be of the token's algorithm family (a JWK that names its ``alg`` must match it exactly). Every
  failure of PyJWT (wrong key type, bad signature, malformed token) is a 401, never a 500.
* **claims**: ``exp`` required and checked; ``aud`` checked against ``ENSAM_AUTH_AUDIENCE`` (comma-separated) and
  ``iss`` against ``ENSAM_AUTH_ISSUER`` when these are set (not checked when unset).
* **off the event loop**: :func:`current_user` is a plain ``def`` dependency (FastAPI runs it in its thread pool);
  :func:`lib.monailabel_patches.install_token_check` puts it in place of monailabel's ``get_current_user``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import requests

logger = logging.getLogger("ensam.auth")

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}  # algorithm prefix -> JWK key type


@dataclass
class _KeySet:
    """The realm's keys as last fetched: a PEM public key (Keycloak) or JWKs by ``kid``."""

    pem: Optional[str] = None
    jwks: Dict[Optional[str], Tuple[Any, Optional[str]]] = field(default_factory=dict)  # kid -> (key, JWK's alg)
    fetched: float = 0.0
    error: Optional[str] = None  # the last fetch failed (kept until the next allowed fetch)


class RealmKeys:
    """The signing keys of one realm, cached (TTL) with a bounded refresh; thread-safe."""

    def __init__(self, realm: str, timeout: float, ttl: float, min_refresh: float):
        self.realm, self.timeout, self.ttl, self.min_refresh = realm, timeout, ttl, min_refresh
        self._keys = _KeySet()
        self._lock = threading.Lock()
        self.fetches = 0  # how many times the realm was asked (for the tests and the log)

    def _get_json(self, url: str) -> Dict[str, Any]:
        r = requests.get(url, timeout=self.timeout)
        r.raise_for_status()
        doc = r.json()
        if not isinstance(doc, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return doc

    def _fetch(self) -> _KeySet:
        import jwt

        self.fetches += 1
        doc = self._get_json(self.realm)
        if doc.get("public_key"):
            return _KeySet(pem=f"-----BEGIN PUBLIC KEY-----\n{doc['public_key']}\n-----END PUBLIC KEY-----")
        jwks_uri = doc.get("jwks_uri") or self._get_json(
            f"{self.realm.rstrip('/')}/.well-known/openid-configuration").get("jwks_uri")
        if not jwks_uri:
            raise ValueError(f"the identity realm {self.realm} publishes neither a public_key nor a jwks_uri")
        keys = {}
        for jwk in self._get_json(jwks_uri).get("keys") or []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                keys[jwk.get("kid")] = (jwt.PyJWK(jwk).key, jwk.get("alg"))
            except jwt.PyJWTError as e:  # a key type this PyJWT cannot use: skipped, named in the log
                logger.warning(f"realm {self.realm}: key {jwk.get('kid')!r} skipped: {e}")
        if not keys:
            raise ValueError(f"the identity realm's key set {jwks_uri} holds no usable signing key")
        return _KeySet(jwks=keys)

    def _refresh(self) -> None:
        try:
            keys = self._fetch()
        except (requests.RequestException, ValueError) as e:
            keys = _KeySet(pem=self._keys.pem, jwks=self._keys.jwks, error=f"{type(e).__name__}: {e}")
            logger.warning(f"realm {self.realm}: keys not fetched: {keys.error}")
        keys.fetched = time.monotonic()
        self._keys = keys  # one reference swap: readers see the old set or the new one

    def _needs_refresh(self, kid: Optional[str]) -> bool:
        keys = self._keys
        age = time.monotonic() - keys.fetched
        unknown = keys.pem is None and kid not in keys.jwks
        return keys.fetched == 0 or age > self.ttl or (unknown and age > self.min_refresh)

    def key_for(self, kid: Optional[str]) -> Tuple[Any, Optional[str]]:
        """(key, the JWK's own ``alg`` or None) for a token's ``kid``; raises ``LookupError`` naming why not.

        One thread at a time asks the realm; while it does, the others go on with the keys they have (a request
        waits for the realm only when there are no keys yet), so a slow realm delays no request whose key is
        known."""
        if self._needs_refresh(kid):
            first = self._keys.fetched == 0
            if self._lock.acquire(blocking=first):
                try:
                    if self._needs_refresh(kid):  # another thread may have refreshed meanwhile
                        self._refresh()
                finally:
                    self._lock.release()
        keys = self._keys
        if keys.pem is not None:
            return keys.pem, None
        if kid not in keys.jwks:
            raise LookupError(keys.error or f"no key {kid!r} in the realm's key set")
        return keys.jwks[kid]


_realms: Dict[str, RealmKeys] = {}
_realms_lock = threading.Lock()


def realm_keys(realm: str, timeout: float) -> RealmKeys:
    """The one :class:`RealmKeys` of ``realm`` (made at first use, with the ``ENSAM_AUTH_KEYS_*`` settings)."""
    from lib.settings import env_value  # the app's lib (lib.server's loading rule); checked at start-up (limits)

    with _realms_lock:
        keys = _realms.get(realm)
        if keys is None:
            keys = _realms[realm] = RealmKeys(realm, timeout, ttl=env_value("ENSAM_AUTH_KEYS_TTL_S"),
                                              min_refresh=env_value("ENSAM_AUTH_KEYS_REFRESH_S"))
        return keys


def token_user(token: str):
    """The monailabel ``User`` of a bearer token (monailabel's ``from_token`` contract); raises
    ``jwt.InvalidTokenError`` (-> 401) for any token that is not valid."""
    import jwt
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import DEFAULT_USER, User

    from lib.settings import env_value  # the app's lib (see lib.server's loading rule)

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise jwt.InvalidTokenError(f"malformed token: {e}") from None
    alg = header.get("alg")
    if alg not in ASYMMETRIC_ALGORITHMS:
        raise jwt.InvalidTokenError(f"token signature algorithm {alg!r} is not accepted")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise jwt.InvalidTokenError("token key id (kid) is not a string")
    try:
        key, key_alg = realm_keys(settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_TIMEOUT).key_for(kid)
    except LookupError as e:
        raise jwt.InvalidTokenError(f"no signing key for the token: {e}") from None
    if key_alg is not None and key_alg != alg:
        raise jwt.InvalidTokenError(f"token algorithm {alg} differs from its key's {key_alg}")
    audience, issuer = env_value("ENSAM_AUTH_AUDIENCE"), env_value("ENSAM_AUTH_ISSUER")
    try:
        payload = jwt.decode(token, key, algorithms=[alg], audience=audience or None, issuer=issuer or None,
                             options={"verify_signature": True, "verify_aud": bool(audience),
                                      "verify_iss": bool(issuer), "verify_exp": True, "require": ["exp"]})
    except jwt.InvalidTokenError:
        raise
    except (jwt.PyJWTError, ValueError, TypeError) as e:  # e.g. an EC token checked with an RSA key
        raise jwt.InvalidTokenError(f"token not verified: {type(e).__name__}: {e}") from None
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []

    def text(claim):
        v = payload.get(claim)
        return None if v is None else str(v)

    return User(username=text(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
                email=text(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL), name=text(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=roles)


def make_current_user():
    """A plain-``def`` FastAPI dependency with the contract of monailabel's ``get_current_user`` (token -> User,
    401 for an invalid token) that FastAPI runs in its thread pool: a slow realm never stalls the event loop."""
    import jwt
    from fastapi import Depends, HTTPException, status
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import oauth2_scheme

    def refused(e: Exception):
        logger.warning(f"token refused: {e}")
        return HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="Could not validate credentials",
                             headers={"WWW-Authenticate": "Bearer"})

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        def current_user():
            return token_user("")
        return current_user

    def current_user(token: str = Depends(oauth2_scheme)):
        try:
            return token_user(token)
        except jwt.InvalidTokenError as e:
            raise refused(e) from None

    return current_user
