"""Official PyPI SDKs against a running dps: the service SDK (azure-iot-deviceprovisioning)
and the device SDK (azure-iot-device, MQTT on 8883 and MQTT over WebSocket on 443).

Run by tests/compat/run.sh with DPS_CREDENTIALS=<data dir>/dev-credentials.json. Covers
enrollments and groups (create with generated keys, get with hidden keys, update with
If-Match, 412 on a stale ETag, attestation mechanism, query with paging, bulk, delete),
registration states (get, query by group, delete), and device registration over MQTT and
WebSocket (individual key, group key, payloads both ways through a webhook and a rule set,
wrong key, disabled enrollment, X.509 group members, polling, throttling).

run.sh checks the closing `python: P passed, F failed` line and the number of cases.
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import ssl
import threading
import time
import traceback
import urllib.parse
import urllib.request

from azure.core.exceptions import HttpResponseError
from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device.common import transport_exceptions
from azure.iot.device.exceptions import ClientError, CredentialError
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from paho.mqtt import client as paho

# The device SDK's register() blocks with no deadline of its own: it runs under within(). The
# service SDK gets azure-core's connection and read timeouts.
CALL_TIMEOUT_S = 60


def service_client(connection_string, ca):
    return DeviceProvisioningClient.from_connection_string(
        connection_string, connection_verify=ca, connection_timeout=10, read_timeout=CALL_TIMEOUT_S
    )


CREDS = json.load(open(os.environ["DPS_CREDENTIALS"]))
CA = CREDS["caCertificatePath"]
CLIENT = service_client(CREDS["serviceConnectionString"], CA)
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


def error_of(call):
    """The HTTP status and DPS errorCode of the error call() raises."""
    try:
        call()
    except HttpResponseError as e:
        return e.status_code, e.response.json().get("errorCode")
    raise AssertionError("expected an HTTP error, got success")


def status_of(call):
    return error_of(call)[0]


def within(what, call):
    """call() in a thread, waited for at most CALL_TIMEOUT_S."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(CALL_TIMEOUT_S)
    if worker.is_alive():
        raise TimeoutError(f"timed out after {CALL_TIMEOUT_S} s: {what}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def refused_credential(call):
    """The exact refusal azure-iot-device 2.14 reports for CONNACK 5: a CredentialError raised from
    the transport's UnauthorizedError with paho's text for return code 5. (A TLS failure is a
    ClientError, or an UnauthorizedError without that text; a timeout is a TimeoutError.)"""
    try:
        call()
    except CredentialError as e:
        cause = e.__cause__
        assert isinstance(cause, transport_exceptions.UnauthorizedError), f"cause: {cause!r}"
        assert str(cause) == paho.connack_string(paho.CONNACK_REFUSED_NOT_AUTHORIZED), f"cause: {cause!r}"
        return
    raise AssertionError("registered with a wrong credential")


def log_events(path, registration_id):
    """One registration's events in a server log (tracing's default format: RFC 3339 time,
    level, the spans (`request{request_id=…}: `), target, then the message and its key=value
    fields): [(seconds since the epoch, message)]."""
    line = re.compile(r'^(\S+)\s+[A-Z]+\s+(?:\S+\{[^}]*\}: )*\S+: (.*?) registration_id="?([^"\s]+)"?(?: |$)')
    events = []
    for text in open(path).read().splitlines():
        m = line.match(text)
        if m and m.group(3) == registration_id:
            events.append((datetime.datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)))
    return events


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
    return within(f"register {registration_id}", device.register)


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


# An EK as swtpm makes it from the SDKs' template (base64 TPM2B_PUBLIC).
SWTPM_EK = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAwvAzM1GSNLZrMA9doPi69i2afOd/WimX/Y912Upwu9g2TuLQV1upTtMtf5X2kBc0AxwT/ejJ5s2D6aqMjW56zn8byaQztFsb3oJZS3pToiWKSidu9u5Lss2VmSo68ce9LSgtD3OrR06+4i+UJR27HjuG/jxYGbWltla/8nhUSDU5IC3WYSADRBb0BFmyoN1xOReLF2nMxIMdhwq6dkKad4b1ByNGRa7Z5YNvdx/ri83yx0EK2lpSeSmWobqDndBLz0X01pFPC3sb6+D57osbLATIPy6BjIMo5RzWCAhbCW+0gBGa7f28Q7BksdpoTnPmCtxT6NPB7PXs/aw31UbB+w=="


@test
def tpm_enrollment_create_get_and_tpm_groups_refused():
    rid = f"{RUN}-tpm"
    e = CLIENT.enrollment.create_or_update(
        id=rid, enrollment={"registrationId": rid, "attestation": {"type": "tpm", "tpm": {"endorsementKey": SWTPM_EK}}}
    )
    assert e["attestation"]["type"] == "tpm", e
    got = CLIENT.enrollment.get(id=rid)
    assert got["attestation"]["tpm"]["endorsementKey"] == SWTPM_EK, got
    att = CLIENT.enrollment.get_attestation_mechanism(id=rid)
    assert att["type"] == "tpm" and att["tpm"]["endorsementKey"] == SWTPM_EK, att
    # A truncated EK, and a TPM group (DPS has none), are refused with 400 400004.
    bad = {"registrationId": rid, "attestation": {"type": "tpm", "tpm": {"endorsementKey": SWTPM_EK[:40]}}}
    assert error_of(lambda: CLIENT.enrollment.create_or_update(id=rid, enrollment=bad)) == (400, 400004)
    group = {"enrollmentGroupId": f"{RUN}-tpm-group", "attestation": {"type": "tpm", "tpm": {"endorsementKey": SWTPM_EK}}}
    assert error_of(
        lambda: CLIENT.enrollment_group.create_or_update(id=group["enrollmentGroupId"], enrollment_group=group)
    ) == (400, 400004)
    CLIENT.enrollment.delete(id=rid)


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
def enrollment_bulk_update_and_update_if_match_etag():
    rid = f"{RUN}-bulk-upd"
    ok = {"isSuccessful": True, "errors": []}
    run_bulk = CLIENT.enrollment.run_bulk_operation
    created = run_bulk(bulk_operation={"mode": "create", "enrollments": [{"registrationId": rid, "attestation": {"type": "symmetricKey"}}]})
    assert created == ok, created
    first = CLIENT.enrollment.get(id=rid)
    updated = run_bulk(bulk_operation={"mode": "update", "enrollments": [{**first, "deviceId": f"{rid}-a"}]})
    assert updated == ok, updated
    second = CLIENT.enrollment.get(id=rid)
    assert second["deviceId"] == f"{rid}-a" and second["etag"] != first["etag"], second
    stale = run_bulk(bulk_operation={"mode": "updateIfMatchETag", "enrollments": [{**first, "deviceId": f"{rid}-b"}]})
    assert stale["isSuccessful"] is False, stale
    assert [(x["registrationId"], x["errorCode"]) for x in stale["errors"]] == [(rid, 412001)], stale
    assert CLIENT.enrollment.get(id=rid)["deviceId"] == f"{rid}-a", "not stored with a stale etag"
    matched = run_bulk(bulk_operation={"mode": "updateIfMatchETag", "enrollments": [{**second, "deviceId": f"{rid}-c"}]})
    assert matched == ok, matched
    assert CLIENT.enrollment.get(id=rid)["deviceId"] == f"{rid}-c", "stored with the current etag"
    CLIENT.enrollment.delete(id=rid)


@test
def group_update_with_if_match_and_412_on_a_stale_etag():
    before = CLIENT.enrollment_group.get(id=GRP)
    changed = {**before, "provisioningStatus": "disabled"}
    after = CLIENT.enrollment_group.create_or_update(id=GRP, enrollment_group=changed, if_match=before["etag"])
    assert after["etag"] != before["etag"] and after["provisioningStatus"] == "disabled", after
    stale = {**before, "provisioningStatus": "enabled"}
    got = error_of(lambda: CLIENT.enrollment_group.create_or_update(id=GRP, enrollment_group=stale, if_match=before["etag"]))
    assert got == (412, 412001), got
    assert CLIENT.enrollment_group.get(id=GRP)["provisioningStatus"] == "disabled", "not stored with a stale etag"


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
    bad = service_client(cs, CA)
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


def custom_group(gid, webhook_url):
    """A symmetric-key enrollment group with custom allocation; its primary key."""
    g = CLIENT.enrollment_group.create_or_update(
        id=gid,
        enrollment_group={
            "enrollmentGroupId": gid,
            "attestation": {"type": "symmetricKey"},
            "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": webhook_url, "apiVersion": "2021-10-01"},
        },
    )
    return g["attestation"]["symmetricKey"]["primaryKey"]


def device_group_key_payload_round_trip_through_a_webhook(ws, tag):
    gid = f"{RUN}-{tag}-custom"
    key = custom_group(gid, os.environ["DPS_WEBHOOK_URL"])
    rid = f"{RUN}-{tag}-member"
    r = register_device(rid, derive(key, rid), {"modelId": tag}, ws)
    assert r.status == "assigned", r
    assert r.registration_state.assigned_hub == CREDS["linkedHubs"][-1], r
    assert json.loads(r.registration_state.response_payload) == {"echo": {"modelId": tag}, "group": gid}, r
    # A string payload (what `az iot device registration create --payload` sends) goes to the
    # webhook as a JSON string, unchanged (protocol.md §14).
    rid = f"{RUN}-{tag}-strpay"
    text = json.dumps({"modelId": tag})
    r = register_device(rid, derive(key, rid), text, ws)
    assert r.status == "assigned", r
    assert json.loads(r.registration_state.response_payload) == {"echo": text, "group": gid}, r
    CLIENT.enrollment_group.delete(id=gid)


def device_wrong_key_for_an_enrolled_id_is_refused_with_connack_5_the_right_key_registers(ws, tag):
    rid = f"{RUN}-{tag}-wrong"
    keys = individual(rid)
    refused_credential(lambda: register_device(rid, base64.b64encode(os.urandom(32)).decode(), websockets=ws))
    r = register_device(rid, keys["primaryKey"], websockets=ws)
    assert r.status == "assigned", r
    CLIENT.enrollment.delete(id=rid)


def device_custom_allocation_by_a_built_in_rule_set(ws, tag):
    """rules://by-model of run.sh's main server: a thermo- model goes to hub-a, with a payload."""
    gid = f"{RUN}-{tag}-rules"
    key = custom_group(gid, "rules://by-model")
    rid = f"{RUN}-{tag}-thermo"
    r = register_device(rid, derive(key, rid), {"modelId": "thermo-x2"}, ws)
    assert r.status == "assigned", r
    assert r.registration_state.assigned_hub == "hub-a.compat.test", r
    assert json.loads(r.registration_state.response_payload) == {"telemetryTopic": f"thermo/{rid}", "group": gid}, r
    CLIENT.enrollment_group.delete(id=gid)


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
    r = within(f"register {rid}", device.register)
    assert r.status == "assigned", r
    assert r.registration_state.device_id == rid, r
    assert r.registration_state.assigned_hub in CREDS["linkedHubs"], r
    assert matched_groups(rid) == [gid], f"{rid} matched {matched_groups(rid)}, not {gid}"
    CLIENT.enrollment_group.delete(id=gid)


def matched_groups(rid):
    """The enrollment groups whose registration states list rid. (Which group a device matched
    is registrationState.x509.enrollmentGroupId, but the device SDK drops it: its
    RegistrationState has no x509 field; the service's registration state has none either.)"""
    groups = [g["enrollmentGroupId"] for g in CLIENT.enrollment_group.query(query_specification={"query": "SELECT *"})]
    return [g for g in groups if rid in [s["registrationId"] for s in CLIENT.device_registration_state.query(id=g)]]


def enroll_on(credentials_variable, rid):
    """An individual symmetric-key enrollment on one of run.sh's other servers: its
    credentials, a service client for it, and the device's primary key."""
    creds = json.load(open(os.environ[credentials_variable]))
    service = service_client(creds["serviceConnectionString"], creds["caCertificatePath"])
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
    # The server logs every answered poll (`operation polled`). The SDK waits its own 2 s
    # (DEFAULT_POLLING_INTERVAL) after an "assigning" register answer, whatever retry-after says.
    events = log_events(os.environ["DPS_STRICT_LOG"], rid)
    registered = [at for at, message in events if message == "registration"]
    polls = [at for at, message in events if message == "operation polled"]
    assert len(registered) == 1 and polls, f"one register and at least one poll in the log: {events}"
    waited = polls[0] - registered[0]
    assert waited >= 1.0, f"the first poll came {waited:.3f} s after the register, before retry-after (1 s)"


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
    assert urllib.request.urlopen(req, context=ctx, timeout=CALL_TIMEOUT_S).status == 202
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
        device_custom_allocation_by_a_built_in_rule_set,
        device_wrong_key_for_an_enrolled_id_is_refused_with_connack_5_the_right_key_registers,
        device_disabled_enrollment_is_reported,
        device_x509_group_member_through_ca_references,
        device_polls_a_server_that_answers_assigning_first_with_an_ecdsa_certificate,
        device_is_throttled_then_backs_off_and_registers,
    ):
        test(lambda case=case, ws=ws, tag=tag: case(ws, tag), f"device {transport}: {case.__name__[7:].replace('_', ' ')}")


print(f"python: {RESULTS['passed']} passed, {RESULTS['failed']} failed", flush=True)
# os._exit: a register() left running by within() must not hold the interpreter open.
os._exit(0 if RESULTS["failed"] == 0 else 1)
