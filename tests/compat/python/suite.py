"""Official PyPI SDKs against a running dps: the service SDK (azure-iot-deviceprovisioning)
and the device SDK (azure-iot-device, MQTT on 8883 and MQTT over WebSocket on 443).

Run by tests/compat/run.sh with DPS_CREDENTIALS=<data dir>/dev-credentials.json. Covers
enrollments and groups (create with generated keys, get with hidden keys, update with
If-Match, 412 on a stale ETag, attestation mechanism, query with paging, bulk, delete),
registration states (get, query by group, delete), and device registration over MQTT and
WebSocket (individual key, group key, payloads both ways through a webhook, wrong key,
disabled enrollment).
"""

import base64
import hashlib
import hmac
import json
import os
import ssl
import sys
import time
import traceback
import urllib.parse
import urllib.request

from azure.core.exceptions import HttpResponseError
from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError, CredentialError
from azure.iot.deviceprovisioning import DeviceProvisioningClient

CREDS = json.load(open(os.environ["DPS_CREDENTIALS"]))
CA = CREDS["caCertificatePath"]
CLIENT = DeviceProvisioningClient.from_connection_string(CREDS["serviceConnectionString"], connection_verify=CA)
RUN = "p%x" % int(time.time() * 1000)
RESULTS = {"passed": 0, "failed": 0}


def test(fn, name=None):
    name = name or fn.__name__.replace("_", " ")
    try:
        fn()
        RESULTS["passed"] += 1
        print(f"ok - python: {name}", flush=True)
    except Exception:  # noqa: BLE001 - report every failure and go on
        RESULTS["failed"] += 1
        print(f"not ok - python: {name}: {traceback.format_exc()}", flush=True)
    return fn


def status_of(call):
    try:
        call()
    except HttpResponseError as e:
        return e.status_code
    raise AssertionError("expected an HTTP error, got success")


def register_device(registration_id, key_b64, payload=None, websockets=False, creds=CREDS):
    """Registers with the official Python device SDK (MQTT, or MQTT over WebSocket)."""
    device = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=creds["hostName"],
        registration_id=registration_id,
        id_scope=creds["idScope"],
        symmetric_key=key_b64,
        websockets=websockets,
        server_verification_cert=open(creds["caCertificatePath"]).read(),
    )
    if payload is not None:
        device.provisioning_payload = payload
    return device.register()


def derive(group_key, registration_id):
    return base64.b64encode(hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()


IND = f"{RUN}-ind"
GRP = f"{RUN}-grp"
STATE = {}


@test
def enrollment_create_get_update_delete():
    e = CLIENT.enrollment.create_or_update(
        id=IND,
        enrollment={"registrationId": IND, "attestation": {"type": "symmetricKey"}, "deviceId": f"{IND}-dev"},
    )
    keys = e["attestation"]["symmetricKey"]
    assert keys["primaryKey"] and keys["secondaryKey"], "PUT returns generated keys"
    got = CLIENT.enrollment.get(id=IND)
    assert not got["attestation"].get("symmetricKey", {}).get("primaryKey"), "get hides keys"
    assert got["deviceId"] == f"{IND}-dev"
    att = CLIENT.enrollment.get_attestation_mechanism(id=IND)
    assert att["symmetricKey"]["primaryKey"] == keys["primaryKey"], "attestation mechanism reveals keys"
    got["provisioningStatus"] = "enabled"
    updated = CLIENT.enrollment.create_or_update(id=IND, enrollment=got, if_match=got["etag"])
    assert updated["etag"] != got["etag"], "etag changes"
    assert updated["attestation"]["symmetricKey"]["primaryKey"] == keys["primaryKey"], "keys kept on update"
    assert status_of(lambda: CLIENT.enrollment.create_or_update(id=IND, enrollment=got, if_match=got["etag"])) == 412
    STATE["ind_key"] = keys["primaryKey"]


@test
def group_create_and_members_register():
    g = CLIENT.enrollment_group.create_or_update(
        id=GRP, enrollment_group={"enrollmentGroupId": GRP, "attestation": {"type": "symmetricKey"}}
    )
    key = g["attestation"]["symmetricKey"]["primaryKey"]
    assert not CLIENT.enrollment_group.get(id=GRP)["attestation"].get("symmetricKey", {}).get("primaryKey")
    assert CLIENT.enrollment_group.get_attestation_mechanism(id=GRP)["symmetricKey"]["primaryKey"] == key
    for i in range(3):
        rid = f"{RUN}-m{i}"
        r = register_device(rid, derive(key, rid), payload={"i": i} if i else None, websockets=i == 1)
        assert r.status == "assigned", r
        assert r.registration_state.assigned_hub in CREDS["linkedHubs"], r
        assert r.registration_state.device_id == rid, r


@test
def registration_states_query_get_delete():
    states = list(CLIENT.device_registration_state.query(id=GRP, top=2))
    ids = sorted(s["registrationId"] for s in states)
    assert ids == [f"{RUN}-m0", f"{RUN}-m1", f"{RUN}-m2"], ids
    s = CLIENT.device_registration_state.get(id=f"{RUN}-m0")
    assert s["status"] == "assigned" and s["deviceId"] == f"{RUN}-m0", s
    CLIENT.device_registration_state.delete(id=f"{RUN}-m0", if_match=s["etag"])
    assert status_of(lambda: CLIENT.device_registration_state.get(id=f"{RUN}-m0")) == 404


@test
def enrollment_query_pages_through_everything():
    ids = [f"{RUN}-q{i}" for i in range(7)]
    result = CLIENT.enrollment.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollments": [{"registrationId": i, "attestation": {"type": "symmetricKey"}} for i in ids]}
    )
    assert result["isSuccessful"], result
    seen = [e["registrationId"] for e in CLIENT.enrollment.query(query_specification={"query": "SELECT *"}, top=3)]
    for i in ids:
        assert seen.count(i) == 1, (i, seen)
    result = CLIENT.enrollment.run_bulk_operation(
        bulk_operation={"mode": "delete", "enrollments": [{"registrationId": i, "attestation": {"type": "symmetricKey"}} for i in ids]}
    )
    assert result["isSuccessful"], result


@test
def group_query_and_bulk():
    gid = f"{RUN}-bulkgrp"
    result = CLIENT.enrollment_group.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}}]}
    )
    assert result["isSuccessful"], result
    groups = [g["enrollmentGroupId"] for g in CLIENT.enrollment_group.query(query_specification={"query": "SELECT *"}, top=1)]
    assert gid in groups and GRP in groups, groups
    CLIENT.enrollment_group.delete(id=gid)


@test
def deletes_and_not_found():
    CLIENT.enrollment.delete(id=IND)
    assert status_of(lambda: CLIENT.enrollment.get(id=IND)) == 404
    assert status_of(lambda: CLIENT.enrollment.delete(id=IND)) == 404
    CLIENT.enrollment_group.delete(id=GRP)
    assert status_of(lambda: CLIENT.enrollment_group.get(id=GRP)) == 404


@test
def bad_connection_key_is_refused():
    cs = CREDS["serviceConnectionString"].rsplit("SharedAccessKey=", 1)[0] + "SharedAccessKey=" + base64.b64encode(b"x" * 32).decode()
    bad = DeviceProvisioningClient.from_connection_string(cs, connection_verify=CA)
    assert status_of(lambda: bad.enrollment.get(id=IND)) == 401


def individual(rid, **extra):
    e = CLIENT.enrollment.create_or_update(
        id=rid, enrollment={"registrationId": rid, "attestation": {"type": "symmetricKey"}, **extra}
    )
    return e["attestation"]["symmetricKey"]


def device_individual_key_with_and_without_payload(ws, tag):
    rid = f"{RUN}-{tag}-ind"
    keys = individual(rid)
    first = register_device(rid, keys["primaryKey"], websockets=ws)
    assert first.status == "assigned", first
    assert first.registration_state.assigned_hub in CREDS["linkedHubs"], first
    assert first.registration_state.sub_status == "initialAssignment", first
    again = register_device(rid, keys["secondaryKey"], payload={"fw": "2.0"}, websockets=ws)
    assert again.registration_state.assigned_hub == first.registration_state.assigned_hub, again
    CLIENT.enrollment.delete(id=rid)


def device_group_key_payload_round_trip_through_a_webhook(ws, tag):
    gid = f"{RUN}-{tag}-custom"
    g = CLIENT.enrollment_group.create_or_update(
        id=gid,
        enrollment_group={
            "enrollmentGroupId": gid,
            "attestation": {"type": "symmetricKey"},
            "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": os.environ["DPS_WEBHOOK_URL"], "apiVersion": "2021-10-01"},
        },
    )
    rid = f"{RUN}-{tag}-member"
    r = register_device(rid, derive(g["attestation"]["symmetricKey"]["primaryKey"], rid), {"modelId": tag}, ws)
    assert r.status == "assigned", r
    assert r.registration_state.assigned_hub == CREDS["linkedHubs"][-1], r
    assert json.loads(r.registration_state.response_payload) == {"echo": {"modelId": tag}, "group": gid}, r
    # A string payload (what `az iot device registration create --payload` sends) goes to the
    # webhook as a JSON string, unchanged (protocol.md §14).
    rid = f"{RUN}-{tag}-strpay"
    text = json.dumps({"modelId": tag})
    r = register_device(rid, derive(g["attestation"]["symmetricKey"]["primaryKey"], rid), text, ws)
    assert r.status == "assigned", r
    assert json.loads(r.registration_state.response_payload) == {"echo": text, "group": gid}, r
    CLIENT.enrollment_group.delete(id=gid)


def device_wrong_key_is_refused(ws, tag):
    rid = f"{RUN}-{tag}-wrong"
    try:
        register_device(rid, base64.b64encode(os.urandom(32)).decode(), websockets=ws)
    except (CredentialError, ClientError):
        return
    raise AssertionError("a wrong key registered")


def device_disabled_enrollment_is_reported(ws, tag):
    rid = f"{RUN}-{tag}-off"
    keys = individual(rid, provisioningStatus="disabled")
    try:
        r = register_device(rid, keys["primaryKey"], websockets=ws)
    except ClientError as e:
        assert "disabled" in str(e).lower() or "disabled" in repr(e.__cause__).lower(), e
    else:
        assert r.status == "disabled", r
    CLIENT.enrollment.delete(id=rid)


def device_x509_group_member_through_ca_references(ws, tag):
    """A group that references the verified root of the certificate store by name (caReferences),
    created with the service SDK; the member presents leaf + intermediate."""
    gid = f"{RUN}-x509-{tag}"
    g = CLIENT.enrollment_group.create_or_update(
        id=gid,
        enrollment_group={
            "enrollmentGroupId": gid,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "compat-root"}}},
        },
    )
    assert g["attestation"]["x509"]["caReferences"]["primary"] == "compat-root", g
    rid = "compat-x509-py-ws" if ws else "compat-x509-py-mqtt"
    pki = os.environ["DPS_PKI"]
    device = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=CREDS["hostName"],
        registration_id=rid,
        id_scope=CREDS["idScope"],
        x509=X509(cert_file=f"{pki}/{rid}.chain.pem", key_file=f"{pki}/{rid}.key"),
        websockets=ws,
        server_verification_cert=open(CA).read(),
    )
    device.provisioning_payload = {"modelId": "x509"}
    r = device.register()
    assert r.status == "assigned", r
    assert r.registration_state.device_id == rid, r
    assert r.registration_state.assigned_hub in CREDS["linkedHubs"], r
    CLIENT.enrollment_group.delete(id=gid)


def enroll_on(credentials_variable, rid):
    """An individual symmetric-key enrollment on one of run.sh's other servers: its
    credentials, a service client for it, and the device's primary key."""
    creds = json.load(open(os.environ[credentials_variable]))
    service = DeviceProvisioningClient.from_connection_string(
        creds["serviceConnectionString"], connection_verify=creds["caCertificatePath"]
    )
    e = service.enrollment.create_or_update(
        id=rid, enrollment={"registrationId": rid, "attestation": {"type": "symmetricKey"}}
    )
    return creds, service, e["attestation"]["symmetricKey"]["primaryKey"]


def device_polls_a_server_that_answers_assigning_first_with_an_ecdsa_certificate(ws, tag):
    """The second server of run.sh: assigning first (retry-after 1 s) and an ECDSA P-256
    certificate, which the SDK's TLS 1.2 must negotiate (ECDHE-ECDSA)."""
    strict, service, key = enroll_on("DPS_STRICT_CREDENTIALS", rid := f"{RUN}-strict-{tag}")
    r = register_device(rid, key, websockets=ws, creds=strict)
    assert r.status == "assigned", r
    assert r.registration_state.assigned_hub == "hub.localhost", r
    assert service.device_registration_state.get(id=rid)["status"] == "assigned"


def device_is_throttled_then_backs_off_and_registers(ws, tag):
    """The third server of run.sh throttles each device to one request per 2 s: after a REST
    register uses that up, the SDK gets 429 with retry-after, waits, and registers."""
    t, _, key = enroll_on("DPS_THROTTLED_CREDENTIALS", rid := f"{RUN}-throttled-{tag}")
    resource = f"{t['idScope']}/registrations/{rid}"
    se = int(time.time()) + 600
    sig = base64.b64encode(
        hmac.new(base64.b64decode(key), f"{urllib.parse.quote(resource, safe='')}\n{se}".encode(), hashlib.sha256).digest()
    ).decode()
    token = f"SharedAccessSignature sr={urllib.parse.quote(resource, safe='')}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn=registration"
    req = urllib.request.Request(
        f"https://{t['hostName']}:{t['httpsPort']}/{resource}/register?api-version=2021-10-01",
        data=json.dumps({"registrationId": rid}).encode(),
        method="PUT",
        headers={"Authorization": token, "Content-Type": "application/json"},
    )
    ctx = ssl.create_default_context(cafile=t["caCertificatePath"])
    assert urllib.request.urlopen(req, context=ctx).status == 202
    r = register_device(rid, key, websockets=ws, creds=t)
    assert r.status == "assigned", r
    log = open(os.environ["DPS_THROTTLED_LOG"]).read().splitlines()
    throttled = [l for l in log if "request throttled" in l and f"registration_id={rid} " in l]
    assert throttled, "the server throttled the SDK's request"


for transport, ws in (("mqtt", False), ("mqtt over websocket", True)):
    tag = "ws" if ws else "mqtt"
    for case in (
        device_individual_key_with_and_without_payload,
        device_group_key_payload_round_trip_through_a_webhook,
        device_wrong_key_is_refused,
        device_disabled_enrollment_is_reported,
        device_x509_group_member_through_ca_references,
        device_polls_a_server_that_answers_assigning_first_with_an_ecdsa_certificate,
        device_is_throttled_then_backs_off_and_registers,
    ):
        test(lambda case=case, ws=ws, tag=tag: case(ws, tag), f"device {transport}: {case.__name__[7:].replace('_', ' ')}")


print(f"python: {RESULTS['passed']} passed, {RESULTS['failed']} failed", flush=True)
sys.exit(0 if RESULTS["failed"] == 0 else 1)
