"""Official PyPI service SDK (azure-iot-deviceprovisioning) against a running dps.

Run by tests/compat/run.sh with DPS_CREDENTIALS=<data dir>/dev-credentials.json. Covers
enrollments and groups (create with generated keys, get with hidden keys, update with
If-Match, 412 on a stale ETag, attestation mechanism, query with paging, bulk, delete) and
registration states (get, query by group, delete) after devices registered over HTTPS.
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
from azure.iot.deviceprovisioning import DeviceProvisioningClient

CREDS = json.load(open(os.environ["DPS_CREDENTIALS"]))
CA = CREDS["caCertificatePath"]
CLIENT = DeviceProvisioningClient.from_connection_string(CREDS["serviceConnectionString"], connection_verify=CA)
RUN = "p%x" % int(time.time() * 1000)
RESULTS = {"passed": 0, "failed": 0}


def test(fn):
    name = fn.__name__.replace("_", " ")
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


def register_device(registration_id, key_b64, payload=None):
    """Registers over the device REST API exactly as the SDKs do (the Python device SDK
    speaks only MQTT, which is a later milestone); used to create registration states."""
    scope = CREDS["idScope"]
    resource = f"{scope}/registrations/{registration_id}"
    expiry = str(int(time.time()) + 3600)
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
    body = json.dumps({"registrationId": registration_id, "payload": payload}).encode()
    url = f"https://{CREDS['hostName']}:{CREDS['httpsPort']}/{resource}/register?api-version=2021-10-01"
    req = urllib.request.Request(url, data=body, method="PUT", headers={"Authorization": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=CA)) as resp:
        assert resp.status == 202, resp.status
        return json.loads(resp.read())


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
        r = register_device(rid, derive(key, rid), payload={"i": i} if i else None)
        assert r["status"] == "assigned", r
        assert r["registrationState"]["assignedHub"] in CREDS["linkedHubs"], r


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


print(f"python: {RESULTS['passed']} passed, {RESULTS['failed']} failed", flush=True)
sys.exit(0 if RESULTS["failed"] == 0 else 1)
