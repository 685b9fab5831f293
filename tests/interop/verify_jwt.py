"""Verify a portcullis token with PyJWT, a JOSE library that shares no code
with the broker's, from the JWKS the broker publishes.

usage: verify_jwt.py JWKS_FILE TOKEN ISSUER AUDIENCE CERT_PEM

Prints {"claims": ..., "cert_x5t_s256": ...}: the verified claims, and the
RFC 8705 thumbprint of CERT_PEM computed here (SHA-256 of the DER,
base64url), for the caller to compare with `cnf`. Exits non-zero when the
token does not verify.
"""

import base64
import hashlib
import json
import ssl
import sys

import jwt


def main() -> int:
    jwks_path, token, issuer, audience, cert_path = sys.argv[1:6]
    with open(jwks_path, encoding="utf-8") as f:
        jwks = jwt.PyJWKSet.from_dict(json.load(f))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "nbf", "sub", "jti"]},
    )
    with open(cert_path, encoding="ascii") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    x5t = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    print(json.dumps({"claims": claims, "cert_x5t_s256": x5t}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
