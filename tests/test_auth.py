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
from cryptography.hazmat.primitives.asymmetric import rsa

from hostile_server import start_hostile_server

USER, ANNOTATOR, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-admin"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class Realm:
    """A local OpenID realm: ``/realms/ensam`` (no public_key), its openid-configuration and JWKS."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "ensam-test-key"
        pub = self.key.public_key().public_numbers()
        self.jwks = {"keys": [{"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": _b64(pub.n),
                               "e": _b64(pub.e)}]}
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
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
        "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri}, ready_path="/auth/")
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
            for _ in range(120):
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


def test_keycloak_style_realm_public_key(realm, monkeypatch):
    """monailabel's own key source (a realm document with ``public_key``, as Keycloak publishes) works too."""
    import lib.server as S
    from monailabel.config import settings

    der = realm.key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)

    class Resp:
        def raise_for_status(self):
            pass

        def json(self):
            return {"realm": "kc", "public_key": base64.b64encode(der).decode()}

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(S.requests, "get", lambda *a, **k: Resp())  # the realm document, without a server
    user = S.token_user(realm.token([USER], username="bob"))
    assert user.username == "bob" and user.roles == [USER]
    with pytest.raises(jwt.InvalidTokenError):
        S.token_user(realm.token([USER], exp_in=-10))


def test_default_bind_is_loopback():
    """`make serve` binds 127.0.0.1 unless HOST= says otherwise (monailabel's own default is 0.0.0.0: the Makefile
    always passes --host)."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")).read()
    assert "HOST ?= 127.0.0.1" in text
    serve = text.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "--host $(HOST)" in serve
