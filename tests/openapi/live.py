#!/usr/bin/env python3
"""Helpers of tests/openapi/run.sh against a running dps (the standard library, and jsonschema_rs,
a schemathesis dependency, for the schema checks):

  live.py token CREDS                 the service SAS header value (1 h) from dev-credentials.json
  live.py device-token CREDS ID       a device SAS header value for ID, signed with SYM_KEY
  live.py status CREDS PATH           the status of a GET of PATH
  live.py seed CREDS PKI              objects for schemathesis to find: enrollments (symmetric key,
                                      TPM, X.509), groups, a verified CA, registered devices
  live.py writer-policy               the config lines of a policy with EnrollmentWrite only
  live.py checks CREDS DOC PKI [--known 'CHECK=PROBLEM']...
                                      the device API as documented, above all for callers that are
                                      not authenticated, and service API cases schemathesis does not
                                      make (rights, audiences, paging, ETags): `ok - device: …` /
                                      `not ok - service: …` lines, each answer's status, headers and
                                      body checked against DOC; a --known PROBLEM of CHECK (a known
                                      server bug) is reported but does not fail it
  live.py summary JUNIT...            one `ok - schemathesis: …` / `not ok - …` line per operation
                                      of schemathesis' JUnit reports

The seeded IDs are the `example`s of docs/openapi.json's path parameters, so that schemathesis'
example and coverage phases read real records.
"""
import base64
import hashlib
import hmac
import http.client
import json
import ssl
import subprocess
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET

API = "api-version=2021-10-01"
# The device keys (a group's key derives its members'): those of the request body examples of
# docs/openapi.json, so that a device still authenticates after schemathesis wrote the example.
SYM_KEY = "c2VydmljZS1hcGktZXhhbXBsZS1wcmltYXJ5LWtleS0wMDAx"
GROUP_KEY = SYM_KEY
# A shared access policy with EnrollmentWrite only (run.sh puts it in the config).
WRITER_POLICY = "oa-writer"
WRITER_KEY = base64.b64encode(b"openapi-check-writer-policy-key1").decode()


def load_creds(path):
    with open(path) as f:
        creds = json.load(f)
    parts = dict(p.split("=", 1) for p in creds["serviceConnectionString"].split(";"))
    creds["_host"] = parts["HostName"]
    creds["_policy"] = parts["SharedAccessKeyName"]
    creds["_key"] = parts["SharedAccessKey"]
    return creds


def sas(resource, key_b64, policy=None, lifetime=3600):
    """`SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`: HMAC-SHA256 of `<encoded sr>\\n<se>`."""
    sr = urllib.parse.quote(resource, safe="")
    se = str(int(time.time()) + lifetime)
    mac = hmac.new(base64.b64decode(key_b64), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(base64.b64encode(mac).decode(), safe='')}&se={se}"
    if policy is not None:
        token += f"&skn={policy}"
    return token


def service_token(creds):
    return sas(creds["_host"], creds["_key"], creds["_policy"])


def derived_key(group_key_b64, registration_id):
    mac = hmac.new(base64.b64decode(group_key_b64), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def device_token(creds, registration_id, key_b64):
    return sas(f"{creds['idScope']}/registrations/{registration_id}", key_b64, "registration")


class Client:
    def __init__(self, creds):
        self.creds = creds
        self.ctx = ssl.create_default_context(cafile=creds["caCertificatePath"])
        self.host = "127.0.0.1"
        self.port = creds["httpsPort"]

    def call(self, method, path, body=None, headers=None, raw=None):
        """One request on a new connection: (status, headers (lower-case names), parsed body or None, raw)."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = [("Host", self.creds["_host"]), ("Content-Type", "application/json"), ("Content-Length", str(len(data or b"")))]
        h += list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in h:
            conn.putheader(name, value)
        conn.endheaders(data)
        resp = conn.getresponse()
        payload = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = None
        return resp.status, hdrs, parsed, payload

    def service(self, method, path, body=None, headers=None):
        h = {"Authorization": service_token(self.creds)}
        h.update(headers or {})
        sep = "&" if "?" in path else "?"
        return self.call(method, f"{path}{sep}{API}", body, h)


# --- test keys and certificates (openssl) -------------------------------------------------------

def openssl(*args, stdin=None):
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout


def tpm_public(modulus: bytes) -> str:
    """base64 TPM2B_PUBLIC of an RSA-2048 storage key (the EK template's attributes)."""
    attrs = 0x00000002 | 0x00000010 | 0x00000020 | 0x00000080 | 0x00010000 | 0x00020000
    policy = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
    t = b"".join([
        (0x0001).to_bytes(2, "big"),  # TPM_ALG_RSA
        (0x000B).to_bytes(2, "big"),  # nameAlg SHA-256
        attrs.to_bytes(4, "big"),
        len(policy).to_bytes(2, "big") + policy,
        (0x0006).to_bytes(2, "big"), (128).to_bytes(2, "big"), (0x0043).to_bytes(2, "big"),  # AES-128-CFB
        (0x0010).to_bytes(2, "big"),  # scheme NULL
        (2048).to_bytes(2, "big"),
        (0).to_bytes(4, "big"),  # default exponent
        len(modulus).to_bytes(2, "big") + modulus,
    ])
    return base64.b64encode(len(t).to_bytes(2, "big") + t).decode()


def rsa_modulus(pki, name):
    key = f"{pki}/{name}.key"
    openssl("genrsa", "-out", key, "2048")
    out = openssl("rsa", "-in", key, "-noout", "-modulus").decode().strip()
    return bytes.fromhex(out.split("=", 1)[1])


def make_pki(pki):
    """A root CA, a self-signed device certificate (oa-x509-1)."""
    def newkey(name):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{pki}/{name}.key")
    newkey("root")
    openssl("req", "-x509", "-new", "-key", f"{pki}/root.key", "-subj", "/CN=OpenAPI Check Root", "-days", "30",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", f"{pki}/root.pem")
    newkey("device")
    openssl("req", "-x509", "-new", "-key", f"{pki}/device.key", "-subj", "/CN=oa-x509-1", "-days", "30",
            "-addext", "extendedKeyUsage=clientAuth", "-out", f"{pki}/device.pem")


def sign_verification(pki, code):
    """A certificate with subject CN `code`, signed by the root's key (proof of possession)."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{pki}/verify.key")
    openssl("req", "-new", "-key", f"{pki}/verify.key", "-subj", f"/CN={code}", "-out", f"{pki}/verify.csr")
    openssl("x509", "-req", "-in", f"{pki}/verify.csr", "-CA", f"{pki}/root.pem", "-CAkey", f"{pki}/root.key",
            "-CAcreateserial", "-days", "30", "-out", f"{pki}/verify.pem")
    return open(f"{pki}/verify.pem").read()


# --- seed ---------------------------------------------------------------------------------------

def seed(creds_path, pki):
    creds = load_creds(creds_path)
    c = Client(creds)
    make_pki(pki)
    ek = tpm_public(rsa_modulus(pki, "ek"))
    srk = tpm_public(rsa_modulus(pki, "srk"))
    with open(f"{pki}/tpm.json", "w") as f:
        json.dump({"endorsementKey": ek, "storageRootKey": srk}, f)
    root_pem = open(f"{pki}/root.pem").read()
    device_pem = open(f"{pki}/device.pem").read()
    sym = {"type": "symmetricKey", "symmetricKey": {"primaryKey": SYM_KEY, "secondaryKey": SYM_KEY}}
    steps = [
        ("PUT", "/enrollments/oa-sym-1", {"registrationId": "oa-sym-1", "attestation": sym,
                                          "initialTwin": {"tags": {"env": "openapi"}}}, 200),
        ("PUT", "/enrollments/oa-disabled-1", {"attestation": sym, "provisioningStatus": "disabled"}, 200),
        ("PUT", "/enrollments/oa-tpm-1", {"attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}, 200),
        ("PUT", "/enrollments/oa-x509-1", {"attestation": {"type": "x509", "x509": {
            "clientCertificates": {"primary": {"certificate": device_pem}}}}}, 200),
        ("PUT", "/enrollmentGroups/oa-group-1", {"attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}, "reprovisionPolicy": {"updateHubAssignment": True,
            "migrateDeviceData": False}}, 200),
        ("PUT", "/certificates/oa-root", {"certificate": root_pem}, 200),
        ("PUT", "/enrollmentGroups/oa-x509-group", {"attestation": {"type": "x509", "x509": {
            "caReferences": {"primary": "oa-root"}}}}, 200),
        ("POST", "/certificates/oa-root/generateVerificationCode", None, 200),
    ]
    failures = 0
    for method, path, body, want in steps:
        status, _, got, raw = c.service(method, path, body)
        if status != want:
            print(f"openapi: seed {method} {path}: {status} {raw[:300]!r}")
            failures += 1
            continue
        if path.endswith("generateVerificationCode"):
            code = got["properties"]["verificationCode"]
            status, _, _, raw = c.service("POST", "/certificates/oa-root/verify",
                                          {"certificate": sign_verification(pki, code)})
            if status != 200:
                print(f"openapi: seed verify: {status} {raw[:300]!r}")
                failures += 1
    # Devices register, so that registration states (one of them in oa-group-1) exist.
    scope = creds["idScope"]
    for rid, key in [("oa-sym-1", SYM_KEY), ("oa-member-1", derived_key(GROUP_KEY, "oa-member-1"))]:
        status, _, _, raw = c.call("PUT", f"/{scope}/registrations/{rid}/register?{API}", {"registrationId": rid},
                                   {"Authorization": device_token(creds, rid, key)})
        if status != 202:
            print(f"openapi: seed register {rid}: {status} {raw[:300]!r}")
            failures += 1
    print(f"openapi: seeded {len(steps) + 3} objects" if failures == 0 else f"openapi: seeding failed ({failures})")
    return 1 if failures else 0


# --- device checks ------------------------------------------------------------------------------

class Doc:
    """Resolves the document's schemas (local `$ref`s only) and checks instances against them."""

    def __init__(self, path):
        with open(path) as f:
            self.doc = json.load(f)
        import jsonschema_rs  # installed with schemathesis

        self.jsonschema_rs = jsonschema_rs

    def deref(self, node):
        while isinstance(node, dict) and "$ref" in node:
            cur = self.doc
            for part in node["$ref"].lstrip("#/").split("/"):
                cur = cur[part]
            node = cur
        return node

    def response(self, path, method, status):
        op = self.doc["paths"][path][method]
        resp = op["responses"].get(str(status))
        return self.deref(resp) if resp is not None else None

    def schema_errors(self, schema, instance):
        wrapped = dict(schema)
        wrapped["components"] = self.doc["components"]
        wrapped["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        validator = self.jsonschema_rs.validator_for(wrapped)
        return [e.message for e in validator.iter_errors(instance)]


class Checks:
    """`ok - AREA: NAME` / `not ok - AREA: NAME: problems` lines. `known` maps a check's name to a
    problem of a known server bug that does not fail it (run.sh's `--known`, `# FINDING n`)."""

    def __init__(self, known):
        self.passed = 0
        self.failed = 0
        self.known = known
        self.area = "device"

    def result(self, name, problems):
        known = [p for p in problems if (name, p) in self.known]
        problems = [p for p in problems if (name, p) not in self.known]
        note = f" (known, not counted: {'; '.join(known)})" if known else ""
        if problems:
            self.failed += 1
            print(f"not ok - {self.area}: {name}: {'; '.join(problems)}{note}")
        else:
            self.passed += 1
            print(f"ok - {self.area}: {name}{note}")


def conforms(doc, path, method, answer, want_status, want_code=None, want_body=None):
    """Problems of an answer against the document: its status is `want_status` and documented,
    its headers and body are the documented ones, and an error's code is `want_code`."""
    status, headers, body, raw = answer
    problems = []
    if status != want_status:
        problems.append(f"status {status}, expected {want_status} (body {raw[:200]!r})")
    spec = doc.response(path, method, status)
    if spec is None:
        problems.append(f"status {status} is not documented for {method.upper()} {path}")
        return problems
    for name, h in spec.get("headers", {}).items():
        h = doc.deref(h)
        if h.get("required") and name.lower() not in headers:
            problems.append(f"header {name} missing")
    content = spec.get("content")
    if content:
        ctype = headers.get("content-type", "")
        if not ctype.split(";")[0].strip() in content:
            problems.append(f"content-type {ctype!r} is not documented")
        if body is None:
            problems.append(f"body is not JSON: {raw[:200]!r}")
        else:
            for e in doc.schema_errors(content["application/json"]["schema"], body):
                problems.append(f"body does not match the schema: {e}")
    elif raw:
        problems.append(f"a body where none is documented: {raw[:200]!r}")
    if want_code is not None and isinstance(body, dict) and body.get("errorCode") != want_code:
        problems.append(f"errorCode {body.get('errorCode')}, expected {want_code}")
    if isinstance(body, dict) and "errorCode" in body:
        if headers.get("x-ms-error-code") != str(body["errorCode"]):
            problems.append("x-ms-error-code differs from errorCode")
        if headers.get("x-ms-request-id") != body.get("trackingId"):
            problems.append("x-ms-request-id differs from trackingId")
    if want_body is not None:
        problems.extend(want_body(body))
    return problems


def checks(creds_path, doc_path, pki, known):
    creds = load_creds(creds_path)
    doc = Doc(doc_path)
    c = Client(creds)
    t = Checks(known)
    scope = creds["idScope"]
    REG = "/{idScope}/registrations/{registrationId}/register"
    OP = "/{idScope}/registrations/{registrationId}/operations/{operationId}"
    STATUS = "/{idScope}/registrations/{registrationId}"
    reg = lambda rid, s=scope: f"/{s}/registrations/{rid}/register?{API}"
    sym_token = device_token(creds, "oa-sym-1", SYM_KEY)
    wrong_token = device_token(creds, "oa-sym-1", base64.b64encode(b"not-the-enrolled-key-000000000001").decode())
    expired = sas(f"{scope}/registrations/oa-sym-1", SYM_KEY, "registration", lifetime=-3600)

    # Unauthenticated and wrongly authenticated callers.
    cases = [
        ("register without Authorization (no TPM keys, no certificate)", "put", REG, reg("oa-sym-1"), {"registrationId": "oa-sym-1"}, None, 401, 401002),
        ("register of an unknown registration ID without Authorization", "put", REG, reg("oa-nobody-1"), None, None, 401, 401002),
        ("register with a token signed by the wrong key", "put", REG, reg("oa-sym-1"), {"registrationId": "oa-sym-1"}, wrong_token, 401, 401002),
        ("register with an expired token", "put", REG, reg("oa-sym-1"), None, expired, 401, 401002),
        ("register with a token that is not a SAS token", "put", REG, reg("oa-sym-1"), None, "Bearer abc", 401, 401002),
        ("register with the service's token", "put", REG, reg("oa-sym-1"), None, service_token(creds), 401, 401002),
        ("register with another device's token", "put", REG, reg("oa-member-1"), None, sym_token, 401, 401002),
        ("register in another ID scope", "put", REG, reg("oa-sym-1", "0ne00000FFF"), None, sym_token, 401, 401002),
        ("register of a disabled enrollment's device, wrong key", "put", REG, reg("oa-disabled-1"), None, wrong_token, 401, 401002),
        ("poll without Authorization", "get", OP, f"/{scope}/registrations/oa-sym-1/operations/5.0.x?{API}", None, None, 401, 401002),
        ("status lookup without Authorization", "post", STATUS, f"/{scope}/registrations/oa-sym-1?{API}", None, None, 401, 401002),
        ("status lookup with a wrong key", "post", STATUS, f"/{scope}/registrations/oa-sym-1?{API}", {}, wrong_token, 401, 401002),
        # Malformed requests are refused before authentication.
        ("register without api-version", "put", REG, f"/{scope}/registrations/oa-sym-1/register", None, None, 400, 400005),
        ("register with a malformed api-version", "put", REG, f"/{scope}/registrations/oa-sym-1/register?api-version=latest", None, None, 400, 400005),
        ("register with a malformed registration ID", "put", REG, f"/{scope}/registrations/bad%20id/register?{API}", None, None, 400, 400002),
        ("register with a malformed ID scope", "put", REG, f"/0ne%2F1/registrations/oa-sym-1/register?{API}", None, None, 400, 400002),
        ("register with a body that is not JSON", "put", REG, reg("oa-sym-1"), b"{not json", sym_token, 400, 400001),
        ("register with a body that is a JSON array", "put", REG, reg("oa-sym-1"), b"[]", sym_token, 400, 400001),
        ("register with a body for another registration ID", "put", REG, reg("oa-sym-1"), {"registrationId": "oa-other"}, sym_token, 400, 400004),
        ("register with a csr", "put", REG, reg("oa-sym-1"), {"registrationId": "oa-sym-1", "csr": "MIIB"}, sym_token, 400, 400004),
        ("poll with a malformed operation ID", "get", OP, f"/{scope}/registrations/oa-sym-1/operations/a%2Fb?{API}", None, sym_token, 400, 400002),
    ]
    for name, method, tpath, url, body, auth, want, code in cases:
        headers = {"Authorization": auth} if auth else {}
        raw = body if isinstance(body, bytes) else None
        answer = c.call(method.upper(), url, None if raw is not None else body, headers, raw=raw)
        t.result(name, conforms(doc, tpath, method, answer, want, code))

    # The TPM challenge: keys in the body, no Authorization.
    tpm = json.load(open(f"{pki}/tpm.json"))
    answer = c.call("PUT", reg("oa-tpm-1"), {"registrationId": "oa-tpm-1", "tpm": tpm})
    t.result("TPM register without Authorization gets the challenge (401, authenticationKey, no status)",
             conforms(doc, REG, "put", answer, 401, want_body=lambda b: [] if b and "authenticationKey" in b and "status" not in b
                      and "errorCode" not in b else [f"not a TPM challenge: {b}"]))
    other_ek = tpm_public(rsa_modulus(pki, "other-ek"))
    answer = c.call("PUT", reg("oa-tpm-1"), {"registrationId": "oa-tpm-1", "tpm": {"endorsementKey": other_ek, "storageRootKey": tpm["storageRootKey"]}})
    t.result("TPM register with another TPM's endorsement key", conforms(doc, REG, "put", answer, 401, 401002))

    # An authenticated device, end to end: register, poll, status lookup.
    answer = c.call("PUT", reg("oa-sym-1"), {"registrationId": "oa-sym-1", "payload": {"modelId": "m-1"}}, {"Authorization": sym_token})
    assigned = lambda b: [] if b and b.get("status") == "assigned" else [f"not assigned: {b}"]
    t.result("register with the enrollment's key (202, assigned)", conforms(doc, REG, "put", answer, 202, want_body=assigned)
             + ([] if answer[1].get("location", "").endswith("/registrations/oa-sym-1/register") else ["no Location"]))
    op_id = (answer[2] or {}).get("operationId", "missing")
    answer = c.call("GET", f"/{scope}/registrations/oa-sym-1/operations/{op_id}?{API}", None, {"Authorization": sym_token})
    t.result("poll the operation (200, assigned)", conforms(doc, OP, "get", answer, 200, want_body=assigned))
    answer = c.call("GET", f"/{scope}/registrations/oa-member-1/operations/{op_id}?{API}", None,
                    {"Authorization": device_token(creds, "oa-member-1", derived_key(GROUP_KEY, "oa-member-1"))})
    t.result("poll another device's operation (404203)", conforms(doc, OP, "get", answer, 404, 404203))
    answer = c.call("POST", f"/{scope}/registrations/oa-sym-1?{API}", {"registrationId": "oa-sym-1"}, {"Authorization": sym_token})
    t.result("status lookup (200, the registration state)", conforms(doc, STATUS, "post", answer, 200, want_body=assigned))
    never = "oa-never-1"
    answer = c.call("POST", f"/{scope}/registrations/{never}?{API}", None,
                    {"Authorization": device_token(creds, never, derived_key(GROUP_KEY, never))})
    t.result("status lookup of a group member that never registered (404202)", conforms(doc, STATUS, "post", answer, 404, 404202))
    member = "oa-member-2"
    answer = c.call("PUT", reg(member), None, {"Authorization": device_token(creds, member, derived_key(GROUP_KEY, member))})
    grouped = lambda b: [] if b and (b.get("registrationState") or {}).get("symmetricKey") == {"enrollmentGroupId": "oa-group-1"} else [f"no group in {b}"]
    t.result("register a group member with an empty body (202, symmetricKey.enrollmentGroupId)", conforms(doc, REG, "put", answer, 202, want_body=grouped))

    # An allocation still running: a custom allocation webhook (here, in a thread) that answers
    # after the server's `allocation.webhook_inline_wait_ms`, so the register answers `assigning`
    # and the first poll 202 with Retry-After, a later one 200.
    webhook = slow_webhook(delay=1.5)
    slow = "oa-slow-1"
    status, _, _, raw = c.service("PUT", f"/enrollments/{slow}", {"attestation": {"type": "symmetricKey", "symmetricKey": {
        "primaryKey": SYM_KEY}}, "allocationPolicy": "custom", "customAllocationDefinition": {
        "webhookUrl": f"http://127.0.0.1:{webhook.server_port}/alloc", "apiVersion": "2021-10-01"}})
    t.result("a custom allocation enrollment is written", [] if status == 200 else [f"{status} {raw[:200]!r}"])
    slow_token = device_token(creds, slow, SYM_KEY)
    answer = c.call("PUT", reg(slow), {"registrationId": slow, "payload": {"modelId": "m-2"}}, {"Authorization": slow_token})
    assigning = lambda b: [] if b and b.get("status") == "assigning" else [f"not assigning: {b}"]
    t.result("register while the webhook works (202, assigning, Retry-After)", conforms(doc, REG, "put", answer, 202, want_body=assigning)
             + ([] if "retry-after" in answer[1] else ["no Retry-After"]))
    op_id = (answer[2] or {}).get("operationId", "missing")
    poll = f"/{scope}/registrations/{slow}/operations/{op_id}?{API}"
    answer = c.call("GET", poll, None, {"Authorization": slow_token})
    t.result("poll while the webhook works (202, assigning, Retry-After)", conforms(doc, OP, "get", answer, 202, want_body=assigning)
             + ([] if "retry-after" in answer[1] else ["no Retry-After"]))
    deadline = time.time() + 15
    while answer[0] == 202 and time.time() < deadline:
        time.sleep(0.5)
        answer = c.call("GET", poll, None, {"Authorization": slow_token})
    t.result("poll after the webhook answered (200, assigned, its payload)", conforms(doc, OP, "get", answer, 200, want_body=lambda b: assigned(b) + (
        [] if ((b or {}).get("registrationState") or {}).get("payload") == {"from": "webhook"} else [f"no webhook payload: {b}"])))
    webhook.shutdown()

    service_checks(creds, doc, c, t)
    print(f"checks: {t.passed} passed, {t.failed} failed")
    return t


def service_checks(creds, doc, c, t):
    """The service API where schemathesis does not look: rights, audiences, paging, ETags."""
    t.area = "service"
    ENR = "/enrollments/{registrationId}"
    QUERY = "/enrollments/query"
    url = lambda path: f"{path}?{API}"
    writer = {"Authorization": sas(creds["_host"], WRITER_KEY, WRITER_POLICY)}
    answer = c.call("GET", url("/enrollments/oa-sym-1"), None, writer)
    t.result("a policy without EnrollmentRead cannot read an enrollment", conforms(doc, ENR, "get", answer, 401, 401002))
    answer = c.call("PUT", url("/enrollments/oa-writer-1"), {"attestation": {"type": "symmetricKey"}}, writer)
    t.result("a policy without EnrollmentRead writes, and its answer hides the generated keys", conforms(
        doc, ENR, "put", answer, 200, want_body=lambda b: [] if (b or {}).get("attestation") == {"type": "symmetricKey", "symmetricKey": {}} else [f"keys shown: {b}"]))
    answer = c.service("POST", "/enrollments/oa-writer-1/attestationmechanism")
    t.result("attestationmechanism shows the generated keys (64 bytes)", conforms(
        doc, "/enrollments/{registrationId}/attestationmechanism", "post", answer, 200,
        want_body=lambda b: [] if len(base64.b64decode(((b or {}).get("symmetricKey") or {}).get("primaryKey", ""))) == 64 else [f"no 64-byte key: {b}"]))
    other_host = {"Authorization": sas("dps.example.net", creds["_key"], creds["_policy"])}
    t.result("a token for another host", conforms(doc, ENR, "get", c.call("GET", url("/enrollments/oa-sym-1"), None, other_host), 401, 401002))
    unknown = {"Authorization": sas(creds["_host"], creds["_key"], "no-such-policy")}
    t.result("a token of an unknown policy", conforms(doc, ENR, "get", c.call("GET", url("/enrollments/oa-sym-1"), None, unknown), 401, 401002))
    token = service_token(creds)
    twice = [("Authorization", token), ("Authorization", token)]
    t.result("two Authorization headers", conforms(doc, ENR, "get", c.call("GET", url("/enrollments/oa-sym-1"), None, twice), 400, 400004))
    t.result("no api-version", conforms(doc, ENR, "get", c.call("GET", "/enrollments/oa-sym-1", None, {"Authorization": token}), 400, 400005))
    status, _, first, _ = c.service("GET", "/enrollments/oa-writer-1")
    c.service("PUT", "/enrollments/oa-writer-1", {"attestation": {"type": "symmetricKey"}})
    answer = c.service("PUT", "/enrollments/oa-writer-1", {"attestation": {"type": "symmetricKey"}}, {"If-Match": (first or {}).get("etag", "x")})
    t.result("PUT with a stale If-Match", conforms(doc, ENR, "put", answer, 412, 412001))
    answer = c.service("DELETE", "/enrollments/oa-no-such-1")
    t.result("DELETE of an enrollment that does not exist", conforms(doc, ENR, "delete", answer, 404, 404201))
    answer = c.service("POST", QUERY, None, {"x-ms-max-item-count": "1"})
    page, page1 = answer[1].get("x-ms-continuation"), answer[2]
    t.result("a query page of 1 names the next page", conforms(doc, QUERY, "post", answer, 200, want_body=lambda b: [] if isinstance(b, list) and len(b) == 1 else [f"not one item: {b}"])
             + ([] if page and answer[1].get("x-ms-item-type") == "enrollment" else ["no x-ms-continuation or x-ms-item-type"]))
    answer = c.service("POST", QUERY, {"query": "SELECT * FROM enrollments"}, {"x-ms-max-item-count": "1", "x-ms-continuation": page or ""})
    t.result("the next page follows the continuation", conforms(doc, QUERY, "post", answer, 200, want_body=lambda b: [] if isinstance(b, list) and len(b) == 1 and b != page1 else [f"not the next item: {b}"]))
    answer = c.service("POST", QUERY, None, {"x-ms-continuation": "bm90LWlzc3VlZA~~"})
    t.result("a continuation this server did not issue", conforms(doc, QUERY, "post", answer, 400, 400004))
    # Not operations of the document, but the same error body.
    for name, method, path, want, code in [("a path nothing serves", "GET", "/nothing/here", 404, 404001),
                                           ("a method a path does not take", "PATCH", "/enrollments/oa-sym-1", 405, 405001)]:
        status, headers, body, raw = c.service(method, path)
        problems = [] if status == want else [f"status {status}, expected {want}"]
        problems += doc.schema_errors({"$ref": "#/components/schemas/ErrorDetails"}, body)
        problems += [] if (body or {}).get("errorCode") == code else [f"errorCode {(body or {}).get('errorCode')}"]
        if want == 405 and headers.get("allow") != "PUT, GET, DELETE":
            problems.append(f"Allow {headers.get('allow')!r}")
        t.result(name, problems)


def slow_webhook(delay):
    """A custom allocation webhook on a free loopback port, in a thread: answers the first linked
    hub and a payload after `delay` seconds."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            time.sleep(delay)
            answer = json.dumps({"iotHubHostName": request["linkedHubs"][0], "payload": {"from": "webhook"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- schemathesis' reports ----------------------------------------------------------------------

def summary(paths):
    """Per operation (JUnit testcase) of every report: ok or not ok, with the first failure."""
    passed = failed = 0
    for path in paths:
        run = path.rsplit("/", 1)[-1].removesuffix(".xml").removeprefix("st-")
        for case in ET.parse(path).getroot().iter("testcase"):
            name = case.get("name")
            bad = [e for e in case if e.tag in ("failure", "error")]
            if bad:
                failed += 1
                detail = (bad[0].get("message") or bad[0].text or "").strip().splitlines()
                print(f"not ok - schemathesis ({run}): {name}: {detail[0] if detail else bad[0].tag}")
            else:
                passed += 1
                skipped = " (skipped)" if case.find("skipped") is not None else ""
                print(f"ok - schemathesis ({run}): {name}{skipped}")
    return passed, failed


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "token":
        print(service_token(load_creds(argv[2])))
        return 0
    if cmd == "device-token":
        creds = load_creds(argv[2])
        print(device_token(creds, argv[3], SYM_KEY))
        return 0
    if cmd == "status":
        print(Client(load_creds(argv[2])).call("GET", argv[3])[0])
        return 0
    if cmd == "seed":
        return seed(argv[2], argv[3])
    if cmd == "writer-policy":
        print(f'[[service.policies]]\nname = "{WRITER_POLICY}"\nprimary_key = "{WRITER_KEY}"\nrights = ["EnrollmentWrite"]')
        return 0
    if cmd == "checks":
        known = set()
        rest = argv[5:]
        while rest[:1] == ["--known"]:
            name, _, problem = rest[1].partition("=")
            known.add((name, problem))
            rest = rest[2:]
        t = checks(argv[2], argv[3], argv[4], known)
        return 1 if t.failed else 0
    if cmd == "summary":
        p, f = summary(argv[2:])
        print(f"schemathesis: {p} passed, {f} failed")
        return 1 if f else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
