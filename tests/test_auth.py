"""Issue 10, access: MONAI Label's authentication mode with this app, against a local identity realm (a signing
key generated here, its JWKS served on 127.0.0.1 by a thread of this test: no external identity server).

Matrix: no token / malformed / expired / foreign-key / "alg: none" / HS256 tokens are 401 everywhere; a valid token
without the route's role is 403; with it, the call succeeds. Roles as monailabel declares them (infer, reading the
datastore and /info: user; saving labels and images: annotator; training, deleting, weights: admin)."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import nibabel as nib
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hostile_server import start_hostile_server

USER, ANNOTATOR, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-admin"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class Realm:
    """A local OpenID realm: ``/realms/ensam`` (no public_key), its openid-configuration and JWKS."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "ensam-test-key"
        self.jwks = {"keys": []}
        self.add_key(self.key, self.kid)
        self.delay = 0.0  # seconds each answer waits (a slow identity server)
        self.hits = 0  # requests answered
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                realm.hits += 1
                time.sleep(realm.delay)
                base = f"http://127.0.0.1:{realm.port}/realms/ensam"
                docs = {"/realms/ensam": {"realm": "ensam"},
                        "/realms/ensam/.well-known/openid-configuration": {
                            "issuer": base, "jwks_uri": f"{base}/protocol/openid-connect/certs",
                            "token_endpoint": f"{base}/protocol/openid-connect/token"},
                        "/realms/ensam/protocol/openid-connect/certs": realm.jwks}
                doc = docs.get(self.path)
                body = json.dumps(doc).encode()
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.uri = f"http://127.0.0.1:{self.port}/realms/ensam"

    def add_key(self, key, kid):
        """Publish ``key`` (RSA) in the realm's key set under ``kid`` (a key rotation)."""
        pub = key.public_key().public_numbers()
        self.jwks["keys"].append({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": _b64(pub.n),
                                  "e": _b64(pub.e)})

    def token(self, roles, exp_in=600, key=None, alg="RS256", kid=None, username="alice"):
        claims = {"preferred_username": username, "email": f"{username}@example.org",
                  "realm_access": {"roles": list(roles)}, "exp": int(time.time()) + exp_in}
        return jwt.encode(claims, key or self.key, algorithm=alg, headers={"kid": kid or self.kid})

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def realm():
    r = Realm()
    yield r
    r.close()


@pytest.fixture(scope="module")
def auth_server(realm, tmp_path_factory):
    srv = start_hostile_server(str(tmp_path_factory.mktemp("auth")), n_images=2, env_extra={
        "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
        "ENSAM_AUTH_KEYS_REFRESH_S": "1"}, ready_path="/auth/")
    try:
        yield srv
    finally:
        srv.stop()


def _label_bytes(server, tmp_path, image="vol1"):
    _, lab, aff = server.images[image]
    p = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(lab, aff), str(p))
    return p.read_bytes()


def calls(server, tmp_path, realm):
    """(name, role needed, function(headers) -> response)."""
    url = server.url
    img, lab, aff = server.images["vol0"]
    p = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(p))
    image_bytes = p.read_bytes()
    label = _label_bytes(server, tmp_path)
    admin = {"Authorization": f"Bearer {realm.token([USER, ANNOTATOR, ADMIN], username='setup')}"}

    def delete_image(h):  # the image is put back first, so that every allowed DELETE has one to delete
        requests.put(f"{url}/datastore/image", params={"image": "authimg"}, headers=admin, timeout=60,
                     files={"file": ("x.nii.gz", image_bytes)}).raise_for_status()
        return requests.delete(f"{url}/datastore/image", params={"id": "authimg"}, headers=h, timeout=60)

    def train_and_stop(h):  # an allowed start is stopped at once, so that the next one is not "already running"
        r = requests.post(f"{url}/train/ensam", json={"device": "cpu", "max_seconds": 2, "max_steps": 1,
                                                     "labels": "blob_a"}, headers=h, timeout=60)
        if r.status_code == 200:
            requests.delete(f"{url}/train/", headers=admin, timeout=60)
            for _ in range(600):  # the stopped job's process ends within seconds idle, up to minutes under load
                if requests.get(f"{url}/train/", headers=admin, timeout=60).json().get("status") != "RUNNING":
                    break
                time.sleep(0.5)
        return r

    return [
        ("GET /info/", USER, lambda h: requests.get(f"{url}/info/", headers=h, timeout=60)),
        ("GET /datastore/", USER, lambda h: requests.get(f"{url}/datastore/", headers=h, timeout=60)),
        ("POST /infer/ensam", USER, lambda h: requests.post(
            f"{url}/infer/ensam", params={"image": "vol0", "output": "json"}, headers=h, timeout=120,
            data={"params": json.dumps({"foreground": [[14, 12, 8]]})})),
        ("PUT /datastore/label", ANNOTATOR, lambda h: requests.put(
            f"{url}/datastore/label", params={"image": "vol1", "tag": "final"}, headers=h, timeout=60,
            files={"label": ("l.nii.gz", label)})),
        ("PUT /datastore/image", ANNOTATOR, lambda h: requests.put(
            f"{url}/datastore/image", params={"image": "authimg"}, headers=h, timeout=60,
            files={"file": ("x.nii.gz", image_bytes)})),
        ("DELETE /datastore/image", ADMIN, lambda h: delete_image(h)),
        ("POST /train/ensam", ADMIN, lambda h: train_and_stop(h)),
        ("DELETE /train/", ADMIN, lambda h: requests.delete(f"{url}/train/", headers=h, timeout=60)),
        ("PUT /model/ensam", ADMIN, lambda h: requests.put(
            f"{url}/model/ensam", headers=h, timeout=60, files={"file": ("w.pt", b"not weights")})),
    ]


def _hs256_with(secret: bytes, claims_b64: bytes) -> str:
    """The classic key-confusion token: HMAC-signed with the server's PUBLIC key as the shared secret (PyJWT
    refuses to make one, so it is assembled by hand)."""
    import hashlib
    import hmac

    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"ensam-test-key"}').rstrip(b"=")
    body = claims_b64.rstrip(b"=")
    sig = base64.urlsafe_b64encode(hmac.new(secret, head + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
    return (head + b"." + body + b"." + sig).decode()


def test_auth_matrix(auth_server, realm, tmp_path):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = realm.key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = base64.urlsafe_b64encode(json.dumps({"preferred_username": "mallory", "exp": int(time.time()) + 600,
                                                  "realm_access": {"roles": [USER, ANNOTATOR, ADMIN]}}).encode())
    refused = {
        "no token": None,
        "malformed": "not-a-jwt",
        "expired": realm.token([USER, ANNOTATOR, ADMIN], exp_in=-60),
        "signed by another key": realm.token([USER, ANNOTATOR, ADMIN], key=other),
        "alg none": f"{header}.{claims.rstrip(b'=').decode()}.",
        "HS256 with the public key as secret": _hs256_with(pem, claims),
        "unknown kid": realm.token([USER, ANNOTATOR, ADMIN], kid="other-kid"),
        # issue 25 (5): a header naming ES256 / EdDSA (the realm's key is RSA) was a 500 (PyJWT's InvalidKeyError)
        "ES256 token": jwt.encode({"exp": int(time.time()) + 600, "realm_access": {"roles": [ADMIN]}},
                                  ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                                  headers={"kid": realm.kid}),
        "EdDSA token": jwt.encode({"exp": int(time.time()) + 600, "realm_access": {"roles": [ADMIN]}},
                                  ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                  headers={"kid": realm.kid}),
    }
    roles = {"user": [USER], "annotator": [ANNOTATOR], "admin": [ADMIN], "all": [USER, ANNOTATOR, ADMIN]}
    matrix = {}
    for name, role, call in calls(auth_server, tmp_path, realm):
        row = {}
        for what, tok in refused.items():
            h = {"Authorization": f"Bearer {tok}"} if tok else {}
            r = call(h)
            row[what] = r.status_code
            assert r.status_code == 401, (name, what, r.status_code, r.text)
        for who, rs in roles.items():
            r = call({"Authorization": f"Bearer {realm.token(rs, username=who)}"})
            row[who] = r.status_code
            if role in rs:
                ok = (200,) if name != "PUT /model/ensam" else (400,)  # allowed: checked, refused as not weights
                assert r.status_code in ok, (name, who, r.status_code, r.text)
            else:
                assert r.status_code == 403 and role in r.json()["detail"], (name, who, r.status_code, r.text)
        matrix[name] = row
    print("\nauth matrix (status codes):")
    cols = list(refused) + list(roles)
    print("| call | " + " | ".join(cols) + " |")
    for name, row in matrix.items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")


def test_realm_keys_are_cached_and_a_slow_realm_stalls_no_one(auth_server, realm):
    """Issue 25 (5): every request fetched the realm document and its OpenID configuration, synchronously on the event
    loop (a realm answering in 1 s made a valid user's /info wait 22.6 s). Now the keys are cached (TTL), a new kid
    refreshes them at most once per ENSAM_AUTH_KEYS_REFRESH_S (1 s here), and the fetch runs in the thread pool:
    while one request waits for a slow realm (a key rotation), the others answer at once."""
    import concurrent.futures

    headers = {"Authorization": f"Bearer {realm.token([USER], username='carol')}"}
    assert requests.get(f"{auth_server.url}/info/", headers=headers, timeout=60).status_code == 200  # keys cached
    realm.hits, realm.delay = 0, 1.0
    try:
        t0 = time.time()
        for _ in range(6):
            assert requests.get(f"{auth_server.url}/info/", headers=headers, timeout=60).status_code == 200
        warm = time.time() - t0
        assert realm.hits == 0 and warm < 3.0, (realm.hits, warm)

        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        realm.add_key(new_key, "rotated-key")
        time.sleep(1.2)  # past the refresh bound
        rotated = {"Authorization": f"Bearer {realm.token([USER], key=new_key, kid='rotated-key', username='dan')}"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.get, f"{auth_server.url}/info/", headers=rotated, timeout=60)
            time.sleep(0.3)  # the rotated token's request is now waiting for the realm
            t0 = time.time()
            r = requests.get(f"{auth_server.url}/info/", headers=headers, timeout=60)
            meanwhile = time.time() - t0
            assert r.status_code == 200
            assert slow.result().status_code == 200, "a key published by the realm is used after a refresh"
        print(f"\nslow realm (1 s an answer): 6 calls with cached keys {warm:.2f} s; a call during a key refresh "
              f"{meanwhile:.2f} s; realm asked {realm.hits} times")
        assert meanwhile < 1.0, meanwhile
        hits = realm.hits
        bogus = {"Authorization": f"Bearer {realm.token([USER], kid='made-up')}"}
        for _ in range(5):  # unknown kids: refused, and the realm is asked at most once in the refresh bound
            assert requests.get(f"{auth_server.url}/info/", headers=bogus, timeout=60).status_code == 401
        assert realm.hits - hits <= 3, realm.hits - hits
    finally:
        realm.delay = 0.0


@pytest.fixture
def in_process_auth(monkeypatch):
    """``lib.http.auth`` in this process with the authentication mode on and an empty key cache."""
    import lib.http.auth as A
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(A, "_realms", {})
    return A


def test_keycloak_style_realm_public_key(realm, in_process_auth, monkeypatch):
    """monailabel's own key source (a realm document with ``public_key``, as Keycloak publishes) works too."""
    der = realm.key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)

    class Resp:
        def raise_for_status(self):
            pass

        def json(self):
            return {"realm": "kc", "public_key": base64.b64encode(der).decode()}

    monkeypatch.setattr(in_process_auth.requests, "get", lambda *a, **k: Resp())  # the realm document, no server
    user = in_process_auth.token_user(realm.token([USER], username="bob"))
    assert user.username == "bob" and user.roles == [USER]
    with pytest.raises(jwt.InvalidTokenError):
        in_process_auth.token_user(realm.token([USER], exp_in=-10))


def test_audience_and_issuer_are_checked_when_set(realm, in_process_auth, monkeypatch):
    """Issue 25 (5): ``aud`` and ``iss`` were never checked. ENSAM_AUTH_AUDIENCE / ENSAM_AUTH_ISSUER: when set, a token
    must carry them; unset, they are not checked."""
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", realm.uri)

    def token(**claims):
        body = {"preferred_username": "erin", "realm_access": {"roles": [USER]}, "exp": int(time.time()) + 600,
                **claims}
        return jwt.encode(body, realm.key, algorithm="RS256", headers={"kid": realm.kid})

    assert in_process_auth.token_user(token()).username == "erin"  # nothing set: nothing checked
    monkeypatch.setenv("ENSAM_AUTH_AUDIENCE", "ensam,other-app")
    monkeypatch.setenv("ENSAM_AUTH_ISSUER", realm.uri)
    assert in_process_auth.token_user(token(aud="ensam", iss=realm.uri)).username == "erin"
    for bad in ({}, {"aud": "someone-else", "iss": realm.uri}, {"aud": "ensam"},
                {"aud": "ensam", "iss": "http://evil.example/realms/ensam"}):
        with pytest.raises(jwt.InvalidTokenError):
            in_process_auth.token_user(token(**bad))


def test_default_bind_is_loopback():
    """`make serve` binds 127.0.0.1 unless HOST= says otherwise (monailabel's own default is 0.0.0.0: the Makefile
    always passes --host)."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")).read()
    assert "HOST ?= 127.0.0.1" in text
    serve = text.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "--host $(HOST)" in serve
