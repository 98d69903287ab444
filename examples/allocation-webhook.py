#!/usr/bin/env python3
"""A complete custom allocation webhook for dps, using only the Python standard library.

Devices send {"modelId": "..."} as their registration payload. Thermostats go to the linked
hub whose name contains "thermo" (else the first linked hub); everything else is spread over
the linked hubs by registration ID. The answer carries an initial twin and a payload that the
device reads from registrationState.payload.

    DPS_WEBHOOK_SECRET=<secret> python3 examples/allocation-webhook.py 8080

With DPS_WEBHOOK_SECRET set (the `secret` of a matching [[webhooks]] entry in the dps
config), requests without a valid x-dps-signature are refused with 401.
"""
import hashlib
import hmac
import json
import os
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("DPS_WEBHOOK_SECRET", "").encode()


def signature_ok(header, body):
    try:
        fields = dict(kv.split("=", 1) for kv in header.split(","))
        t, v1 = fields["t"], fields["v1"]
    except (KeyError, ValueError):
        return False
    expected = hmac.new(SECRET, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) < 300


def allocate(request):
    context = request["deviceRuntimeContext"]
    registration_id = context["registrationId"]
    payload = context.get("payload") or {}
    hubs = request["linkedHubs"]
    model = payload.get("modelId")
    if not isinstance(model, str):
        # A 4xx with a reason: the device's registration fails with this text in its message.
        return 400, {"message": "payload.modelId (a string) is required"}
    if model.startswith("thermo"):
        hub = next((h for h in hubs if "thermo" in h), hubs[0])
    else:
        hub = hubs[zlib.crc32(registration_id.lower().encode()) % len(hubs)]
    return 200, {
        "iotHubHostName": hub,
        "initialTwin": {"tags": {"model": model}, "properties": {"desired": {"interval": 30}}},
        "payload": {"telemetryTopic": f"{model}/{registration_id}"},
    }


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if SECRET and not signature_ok(self.headers.get("x-dps-signature", ""), body):
            status, answer = 401, {"message": "bad or missing x-dps-signature"}
        else:
            try:
                status, answer = allocate(json.loads(body))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                status, answer = 400, {"message": f"bad allocation request: {e!r}"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write("webhook: " + fmt % args + "\n")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
