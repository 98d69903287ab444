// Official Node SDKs against a running dps: the service client (enrollments, groups,
// registration states, paging, bulk, ETags) and the device client over HTTPS, MQTT and MQTT
// over WebSocket (individual key, group-derived key, payload, wrong key, disabled enrollment,
// custom allocation by webhook and by rule set, X.509 groups and individual enrollments,
// polling, throttling).
//
// Run by tests/compat/run.sh with DPS_CREDENTIALS=<data dir>/dev-credentials.json and
// NODE_EXTRA_CA_CERTS=<test CA>, against a dps listening on port 443; run.sh also checks the
// closing `node: P passed, F failed` line and the number of cases.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const shared = require('./check');

const creds = JSON.parse(fs.readFileSync(process.env.DPS_CREDENTIALS, 'utf8'));
const host = creds.hostName;
const scope = creds.idScope;
const hubs = creds.linkedHubs;
const run = `n${Date.now().toString(36)}`; // unique prefix per run

// No SDK call has a deadline of its own, and a promise that never settles ends node with exit
// code 0 in the middle of the suite: every SDK call below is raced against CALL_TIMEOUT_MS.
const CALL_TIMEOUT_MS = 60000;
const within = (promise, what) => shared.within(promise, what, CALL_TIMEOUT_MS);
const timed = (target, what) => shared.timed(target, what, CALL_TIMEOUT_MS);
const serviceFor = (c) => timed(ProvisioningServiceClient.fromConnectionString(c.serviceConnectionString), `service ${c.hostName}`);
const service = serviceFor(creds);

let passed = 0;
let failed = 0;
async function test(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok - node: ${name}`);
  } catch (e) {
    failed++;
    console.log(`not ok - node: ${name}: ${e && e.stack ? e.stack : e}`);
  }
}
const { assert, eq, rejects, statusOf } = shared;
// The errorCode of the DPS error body an SDK error carries (responseBody is the JSON text).
function errorCodeOf(e) {
  try {
    return JSON.parse(e.responseBody).errorCode;
  } catch (_) {
    return undefined;
  }
}
// The exact refusal each transport reports for a credential the server does not accept, so that
// a TLS error, a refused connection or a timeout fails the case. HTTPS: the SDK's typed
// UnauthorizedError with the 401 response and errorCode 401002. MQTT and MQTT-WS: the server
// answers CONNACK return code 5; the Node provisioning MQTT transport hands mqtt.js's error back
// untranslated (azure-iot-provisioning-device-mqtt 1.8.1 `_connect`: `callback(err)`), a plain
// Error with the return code in `code`.
function refusedCredential(transport) {
  return (e) => {
    if (transport === 'http') {
      eq(e.name, 'UnauthorizedError', `error type (${e.message})`);
      eq(statusOf(e), 401, 'HTTP status');
      eq(errorCodeOf(e), 401002, 'errorCode');
    } else {
      eq(`${e.name}: ${e.message}`, 'Error: Connection refused: Not authorized', 'mqtt.js error for CONNACK 5');
      eq(e.code, 5, 'CONNACK return code');
    }
  };
}
// One registration's events in a server log (tracing's default format: RFC 3339 time, level,
// target, then the message and its key=value fields): [{ at: ms since the epoch, message }].
function logEvents(path, registrationId) {
  const line = /^(\S+)\s+[A-Z]+\s+(?:\S+\{[^}]*\}: )*\S+: (.*?) registration_id="?([^"\s]+)"?(?: |$)/;
  return fs
    .readFileSync(path, 'utf8')
    .split('\n')
    .map((l) => line.exec(l))
    .filter((m) => m && m[3] === registrationId)
    .map((m) => ({ at: Date.parse(m[1]), message: m[2] }));
}

// register() of the device SDK, under within().
function registerWith(registrationId, security, payload, target, Transport) {
  const client = ProvisioningDeviceClient.create(target.host, target.scope, new Transport(), security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return within(client.register(), `register ${registrationId} over ${Transport.name}`);
}
function register(registrationId, key, payload, target = { host, scope }, Transport = Http) {
  return registerWith(registrationId, new SymmetricKeySecurityClient(registrationId, key), payload, target, Transport);
}
// The SDK's promise form of runBulkEnrollmentOperation never settles (it only calls back
// when a callback was given), so use the callback form.
function bulk(operation) {
  return within(
    new Promise((resolve, reject) => {
      service.runBulkEnrollmentOperation(operation, (err, result) => (err ? reject(err) : resolve({ responseBody: result })));
    }),
    `bulk ${operation.mode}`
  );
}
// An enrollment group with custom allocation, created through the service SDK.
async function customGroup(enrollmentGroupId, webhookUrl) {
  const { responseBody } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    allocationPolicy: 'custom',
    customAllocationDefinition: { webhookUrl, apiVersion: '2021-10-01' },
  });
  return responseBody;
}
// PUT …/register over plain HTTPS (no SDK); resolves with the status code.
function restRegister(target, registrationId, key) {
  const resource = `${target.idScope}/registrations/${registrationId}`;
  const se = Math.floor(Date.now() / 1000) + 600;
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(`${encodeURIComponent(resource)}\n${se}`).digest('base64');
  const token = `SharedAccessSignature sr=${encodeURIComponent(resource)}&sig=${encodeURIComponent(sig)}&se=${se}&skn=registration`;
  const answered = new Promise((resolve, reject) => {
    const req = require('https').request(
      {
        host: target.hostName,
        port: target.httpsPort,
        method: 'PUT',
        path: `/${resource}/register?api-version=2021-10-01`,
        headers: { authorization: token, 'content-type': 'application/json' },
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode));
      }
    );
    req.on('error', reject);
    req.end(JSON.stringify({ registrationId }));
  });
  return within(answered, `REST register ${registrationId}`);
}
// Every page of a service query, each checked for its size and x-ms-item-type. The promise
// form of next() ignores the stored continuation token: it is passed explicitly.
async function allPages(q, pageSize, itemType) {
  const items = [];
  let pages = 0;
  while (q.hasMoreResults) {
    const { responseBody, httpResponse } = await q.next(q.continuationToken);
    assert(++pages < 100, 'paging terminates');
    eq(httpResponse.headers['x-ms-item-type'], itemType, 'x-ms-item-type');
    assert(responseBody.length <= pageSize, `page size ${pageSize}, got ${responseBody.length}`);
    items.push(...responseBody);
  }
  return { items, pages };
}
function deriveKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

const TRANSPORTS = [['http', Http], ['mqtt', Mqtt], ['mqttws', MqttWs]];

async function main() {
  const indId = `${run}-ind`;
  const grpId = `${run}-grp`;

  await test('service: create individual enrollment, server generates keys', async () => {
    const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
      registrationId: indId,
      deviceId: `${indId}-device`,
      attestation: { type: 'symmetricKey', symmetricKey: {} },
      provisioningStatus: 'enabled',
      initialTwin: { tags: { env: 'compat' }, properties: { desired: { x: 1 } } },
    });
    eq(e.registrationId, indId, 'registrationId');
    assert(e.attestation.symmetricKey.primaryKey && e.attestation.symmetricKey.secondaryKey, 'generated keys returned by the PUT');
    assert(typeof e.etag === 'string' && e.etag.length > 2, 'etag');
    assert(e.createdDateTimeUtc && e.lastUpdatedDateTimeUtc, 'dates');
  });

  await test('service: get hides keys, attestation mechanism reveals them', async () => {
    const { responseBody: e } = await service.getIndividualEnrollment(indId);
    eq(e.deviceId, `${indId}-device`, 'deviceId');
    assert(!e.attestation.symmetricKey || !e.attestation.symmetricKey.primaryKey, 'get must not reveal keys');
    const { responseBody: a } = await service.getIndividualEnrollmentAttestationMechanism(indId);
    eq(a.type, 'symmetricKey', 'type');
    assert(a.symmetricKey.primaryKey.length >= 24, 'attestation mechanism reveals the primary key');
  });

  await test('service: update with matching etag, 412 with a stale one, keys kept', async () => {
    const { responseBody: before } = await service.getIndividualEnrollment(indId);
    const keys = (await service.getIndividualEnrollmentAttestationMechanism(indId)).responseBody.symmetricKey;
    before.provisioningStatus = 'enabled';
    before.optionalDeviceInformation = { model: 'compat' };
    const { responseBody: after } = await service.createOrUpdateIndividualEnrollment(before);
    assert(after.etag !== before.etag, 'etag changes on write');
    eq(after.attestation.symmetricKey.primaryKey, keys.primaryKey, 'keys survive a get-modify-put');
    await rejects(service.createOrUpdateIndividualEnrollment(before), (e) => eq(statusOf(e), 412, 'status'), 'stale etag');
  });

  await test('device http: individual enrollment registers and is assigned', async () => {
    const keys = (await service.getIndividualEnrollmentAttestationMechanism(indId)).responseBody.symmetricKey;
    const r = await register(indId, keys.primaryKey);
    eq(r.status, 'assigned', 'status');
    eq(r.deviceId, `${indId}-device`, 'deviceId from the enrollment');
    assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub} is a linked hub`);
    const again = await register(indId, keys.secondaryKey);
    eq(again.assignedHub, r.assignedHub, 'same hub on re-registration with the secondary key');
  });

  let groupKey;
  await test('service: create symmetric-key enrollment group', async () => {
    const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: grpId,
      attestation: { type: 'symmetricKey', symmetricKey: {} },
      provisioningStatus: 'enabled',
    });
    eq(g.enrollmentGroupId, grpId, 'id');
    groupKey = g.attestation.symmetricKey.primaryKey;
    const { responseBody: read } = await service.getEnrollmentGroup(grpId);
    assert(!read.attestation.symmetricKey || !read.attestation.symmetricKey.primaryKey, 'group get hides keys');
    const { responseBody: a } = await service.getEnrollmentGroupAttestationMechanism(grpId);
    eq(a.symmetricKey.primaryKey, groupKey, 'group attestation mechanism');
  });

  await test('device http: group member with derived key, with a payload', async () => {
    const id = `${run}-member-1`;
    const r = await register(id, deriveKey(groupKey, id), { modelId: 'dtmi:contoso:thermostat;1', n: 1 });
    eq(r.status, 'assigned', 'status');
    eq(r.deviceId, id, 'group members use the registration ID as device ID');
    assert(hubs.includes(r.assignedHub), 'linked hub');
  });

  await test('device http: second group member without a payload', async () => {
    const id = `${run}-member-2`;
    const r = await register(id, deriveKey(groupKey, id));
    eq(r.status, 'assigned', 'status');
  });

  await test('device http: group member with a wrong derived key is refused with 401 401002', async () => {
    const id = `${run}-member-3`;
    await rejects(register(id, deriveKey(crypto.randomBytes(32).toString('base64'), id)), refusedCredential('http'), 'wrong key');
  });

  await test('device http: disabled individual enrollment blocks a group member', async () => {
    const id = `${run}-member-blocked`;
    await service.createOrUpdateIndividualEnrollment({
      registrationId: id,
      attestation: { type: 'symmetricKey', symmetricKey: {} },
      provisioningStatus: 'disabled',
    });
    await rejects(register(id, deriveKey(groupKey, id)), (e) => {
      assert(/disabled/i.test(e.message), `error mentions disabled: ${e.message}`);
    }, 'disabled');
  });

  await test('service: registration states get, group query, delete', async () => {
    const id = `${run}-member-1`;
    const { responseBody: s } = await service.getDeviceRegistrationState(id);
    eq(s.registrationId, id, 'registrationId');
    eq(s.status, 'assigned', 'status');
    assert(hubs.includes(s.assignedHub), 'assignedHub');
    const q = service.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT *' }, grpId, 1);
    const ids = [];
    let pages = 0;
    while (q.hasMoreResults) {
      // The promise form of next() ignores the stored token: pass it explicitly.
      const { responseBody } = await q.next(q.continuationToken);
      assert(++pages < 10, 'paging terminates');
      assert(responseBody.length <= 1, 'page size 1');
      responseBody.forEach((x) => ids.push(x.registrationId));
    }
    eq(ids.sort(), [`${run}-member-1`, `${run}-member-2`], 'registrations of the group');
    await service.deleteDeviceRegistrationState(s);
    await rejects(service.getDeviceRegistrationState(id), (e) => eq(statusOf(e), 404, 'status'), 'deleted state');
  });

  await test('service: query with paging visits every enrollment once', async () => {
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(`${run}-page-${i}`);
    const { responseBody: created } = await bulk({
      mode: 'create',
      enrollments: ids.map((registrationId) => ({ registrationId, attestation: { type: 'symmetricKey', symmetricKey: {} } })),
    });
    eq(created.isSuccessful, true, "bulk create");
    const { items } = await allPages(service.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 2), 2, 'enrollment');
    const seen = items.map((e) => e.registrationId);
    for (const id of ids) assert(seen.filter((s) => s === id).length === 1, `${id} seen once`);
    const { responseBody: dup } = await bulk({
      mode: 'create',
      enrollments: [{ registrationId: ids[0], attestation: { type: 'symmetricKey' } }],
    });
    eq(dup.isSuccessful, false, 'bulk create of an existing enrollment fails');
    eq(dup.errors[0].registrationId, ids[0], 'bulk error names the enrollment');
    eq(dup.errors[0].errorCode, 409001, 'bulk error code');
    const { responseBody: del } = await bulk({
      mode: 'delete',
      enrollments: ids.map((registrationId) => ({ registrationId, attestation: { type: 'symmetricKey' } })),
    });
    eq(del.isSuccessful, true, 'bulk delete');
  });

  await test('service: bulk update and updateIfMatchETag (412001 with a stale etag)', async () => {
    const id = `${run}-bulk-upd`;
    const { responseBody: created } = await bulk({ mode: 'create', enrollments: [{ registrationId: id, attestation: { type: 'symmetricKey', symmetricKey: {} } }] });
    eq(created, { isSuccessful: true, errors: [] }, 'bulk create');
    const { responseBody: first } = await service.getIndividualEnrollment(id);
    const { responseBody: updated } = await bulk({ mode: 'update', enrollments: [{ ...first, etag: undefined, deviceId: `${id}-a` }] });
    eq(updated, { isSuccessful: true, errors: [] }, 'bulk update');
    const { responseBody: second } = await service.getIndividualEnrollment(id);
    eq(second.deviceId, `${id}-a`, 'bulk update stored');
    assert(second.etag !== first.etag, 'etag changes on a bulk update');
    const { responseBody: stale } = await bulk({ mode: 'updateIfMatchETag', enrollments: [{ ...first, deviceId: `${id}-b` }] });
    eq(stale.isSuccessful, false, 'updateIfMatchETag with a stale etag');
    eq(stale.errors.map((x) => [x.registrationId, x.errorCode]), [[id, 412001]], 'bulk errors');
    eq((await service.getIndividualEnrollment(id)).responseBody.deviceId, `${id}-a`, 'not stored with a stale etag');
    const { responseBody: matched } = await bulk({ mode: 'updateIfMatchETag', enrollments: [{ ...second, deviceId: `${id}-c` }] });
    eq(matched, { isSuccessful: true, errors: [] }, 'updateIfMatchETag with the current etag');
    eq((await service.getIndividualEnrollment(id)).responseBody.deviceId, `${id}-c`, 'stored with the current etag');
    await service.deleteIndividualEnrollment(id);
  });

  await test('service: enrollment group If-Match (412 with a stale etag), group query with paging', async () => {
    const ids = [0, 1, 2].map((i) => `${run}-gq-${i}`);
    for (const enrollmentGroupId of ids) {
      await service.createOrUpdateEnrollmentGroup({ enrollmentGroupId, attestation: { type: 'symmetricKey', symmetricKey: {} } });
    }
    const { responseBody: before } = await service.getEnrollmentGroup(ids[0]);
    before.provisioningStatus = 'disabled';
    const { responseBody: after } = await service.createOrUpdateEnrollmentGroup(before);
    assert(after.etag !== before.etag, 'etag changes on write');
    eq(after.provisioningStatus, 'disabled', 'update with the current etag stored');
    before.provisioningStatus = 'enabled';
    await rejects(service.createOrUpdateEnrollmentGroup(before), (e) => {
      eq([e.name, statusOf(e), errorCodeOf(e)], ['InvalidEtagError', 412, 412001], 'stale group etag');
    }, 'stale group etag');
    eq((await service.getEnrollmentGroup(ids[0])).responseBody.provisioningStatus, 'disabled', 'not stored with a stale etag');
    const { items, pages } = await allPages(service.createEnrollmentGroupQuery({ query: 'SELECT *' }, 1), 1, 'enrollmentGroup');
    const seen = items.map((g) => g.enrollmentGroupId);
    eq(ids.map((id) => seen.filter((x) => x === id).length), [1, 1, 1], `each group seen once in ${JSON.stringify(seen)}`);
    assert(pages >= ids.length, `one page per group (${pages} pages)`);
    for (const id of ids) await service.deleteEnrollmentGroup(id);
  });

  await test('service: delete with etag, then 404', async () => {
    const { responseBody: e } = await service.getIndividualEnrollment(indId);
    await rejects(service.deleteIndividualEnrollment(indId, '"stale"'), (err) => eq(statusOf(err), 412, 'status'), 'stale delete');
    await service.deleteIndividualEnrollment(indId, e.etag);
    await rejects(service.getIndividualEnrollment(indId), (err) => eq(statusOf(err), 404, 'status'), 'deleted');
    await service.deleteIndividualEnrollment(`${run}-member-blocked`);
    await service.deleteEnrollmentGroup(grpId);
    await rejects(service.getEnrollmentGroup(grpId), (err) => eq(statusOf(err), 404, 'status'), 'group deleted');
  });

  await test('device http: custom allocation group, the webhook returns a payload to the device', async () => {
    const gid = `${run}-custom`;
    const g = await customGroup(gid, process.env.DPS_WEBHOOK_URL);
    eq(g.allocationPolicy, 'custom', 'allocationPolicy stored');
    const id = `${run}-custom-1`;
    const r = await register(id, deriveKey(g.attestation.symmetricKey.primaryKey, id), { modelId: 'dtmi:x;1', fw: '1.2.3' });
    eq(r.status, 'assigned', 'status');
    eq(r.assignedHub, hubs[hubs.length - 1], 'the webhook chose the last linked hub');
    eq(r.payload, { echo: { modelId: 'dtmi:x;1', fw: '1.2.3' }, group: gid }, 'registrationState.payload from the webhook');
    await service.deleteEnrollmentGroup(gid);
  });

  await test('device http: the example webhook of docs/allocation.md, signed requests', async () => {
    const gid = `${run}-example`;
    const g = await customGroup(gid, process.env.DPS_EXAMPLE_WEBHOOK_URL);
    const key = (id) => deriveKey(g.attestation.symmetricKey.primaryKey, id);
    const id = `${run}-ex-thermo`;
    const r = await register(id, key(id), { modelId: 'thermostat' });
    eq(r.status, 'assigned', 'status');
    eq(r.assignedHub, hubs[0], 'no hub named thermo: the first linked hub');
    eq(r.payload, { telemetryTopic: `thermostat/${id}` }, 'registrationState.payload from the webhook');
    const bad = `${run}-ex-nomodel`;
    await rejects(
      register(bad, key(bad), { fw: '1.0' }),
      (e) => {
        const state = e.result && e.result.registrationState;
        eq(state && state.errorCode, 400209, 'errorCode');
        // The device learns the class; the webhook's reason is in the operator's log.
        assert(/the webhook answered HTTP 400 \(the server log has the details/.test(state.errorMessage), `errorMessage: ${state.errorMessage}`);
        assert(!/modelId/.test(state.errorMessage), `the webhook's words are not sent: ${state.errorMessage}`);
        const logged = fs
          .readFileSync(process.env.DPS_MAIN_LOG, 'utf8')
          .split('\n')
          .some((l) => l.includes('custom allocation failed') && l.includes(bad) && /payload\.modelId \(a string\) is required/.test(l));
        assert(logged, 'the log has the webhook\'s reason');
      },
      'the webhook refused the payload'
    );
    await service.deleteEnrollmentGroup(gid);
  });

  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: custom allocation by a built-in rule set (rules://by-model)`, async () => {
      const gid = `${run}-rules-${name}`;
      const g = await customGroup(gid, 'rules://by-model');
      eq(g.customAllocationDefinition.webhookUrl, 'rules://by-model', 'webhookUrl stored');
      const key = (id) => deriveKey(g.attestation.symmetricKey.primaryKey, id);
      const id = `${run}-thermo-${name}`;
      const r = await register(id, key(id), { modelId: 'thermo-x2' }, { host, scope }, Transport);
      eq(r.status, 'assigned', 'status');
      eq(r.assignedHub, 'hub-a.compat.test', 'the rule chose the hub');
      eq(r.payload, { telemetryTopic: `thermo/${id}`, group: gid }, 'registrationState.payload from the rule');
      const bad = `${run}-thermo-bad-${name}`;
      await rejects(
        register(bad, key(bad), { modelId: 42 }, { host, scope }, Transport),
        (e) => {
          const state = e.result && e.result.registrationState;
          eq(state && state.errorCode, 400003, `errorCode (${e.name}: ${e.message})`);
          assert(/modelId/.test(state.errorMessage), `errorMessage names the field: ${state.errorMessage}`);
        },
        'payload refused by the schema'
      );
      await service.deleteEnrollmentGroup(gid);
    });
  }

  for (const [name, Transport] of [['mqtt', Mqtt], ['mqttws', MqttWs]]) {
    const gid = `${run}-${name}-grp`;
    let g;
    await test(`device ${name}: individual key, with and without a payload`, async () => {
      const id = `${run}-${name}-ind`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
        initialTwin: { tags: { transport: name } },
      });
      const r = await register(id, e.attestation.symmetricKey.primaryKey, undefined, { host, scope }, Transport);
      eq(r.status, 'assigned', 'status');
      eq(r.deviceId, id, 'deviceId');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub}`);
      const again = await register(id, e.attestation.symmetricKey.secondaryKey, { fw: '2.0' }, { host, scope }, Transport);
      eq(again.assignedHub, r.assignedHub, 'same hub with the secondary key and a payload');
      const { responseBody: s } = await service.getDeviceRegistrationState(id);
      eq(s.status, 'assigned', 'service sees the registration');
      await service.deleteIndividualEnrollment(id);
    });
    await test(`device ${name}: group-derived key with a payload through a custom allocation webhook`, async () => {
      g = await customGroup(gid, process.env.DPS_WEBHOOK_URL);
      const id = `${run}-${name}-member`;
      const r = await register(id, deriveKey(g.attestation.symmetricKey.primaryKey, id), { modelId: name }, { host, scope }, Transport);
      eq(r.status, 'assigned', 'status');
      eq(r.assignedHub, hubs[hubs.length - 1], 'the webhook chose the hub');
      eq(r.payload, { echo: { modelId: name }, group: gid }, 'registrationState.payload from the webhook');
    });
    await test(`device ${name}: wrong key for an enrolled ID is refused with CONNACK 5, the right key registers`, async () => {
      const id = `${run}-${name}-wrong`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      await rejects(register(id, crypto.randomBytes(32).toString('base64'), undefined, { host, scope }, Transport), refusedCredential(name), 'wrong key');
      const r = await register(id, e.attestation.symmetricKey.primaryKey, undefined, { host, scope }, Transport);
      eq(r.status, 'assigned', 'the enrollment registers with its own key');
      await service.deleteIndividualEnrollment(id);
    });
    await test(`device ${name}: disabled enrollment is reported`, async () => {
      const id = `${run}-${name}-off`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
        provisioningStatus: 'disabled',
      });
      await rejects(register(id, e.attestation.symmetricKey.primaryKey, undefined, { host, scope }, Transport), (err) => {
        assert(/disabled/i.test(err.message) || (err.result && err.result.status === 'disabled'), `disabled: ${err.message}`);
      }, 'disabled');
      await service.deleteIndividualEnrollment(id);
    });
    await service.deleteEnrollmentGroup(gid).catch(() => {});
  }

  // X.509: a group on the root CA (verified in the certificate store by run.sh), members with
  // leaf + intermediate chains; an individual enrollment pinning a self-signed certificate.
  const pki = (f) => fs.readFileSync(`${process.env.DPS_PKI}/${f}`, 'utf8');
  const x509Group = `${run}-x509`;
  await test('service: X.509 enrollment group and individual enrollment', async () => {
    const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: x509Group,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: pki('root.pem') } } } },
    });
    eq(g.attestation.type, 'x509', 'type');
    eq(g.attestation.x509.signingCertificates.primary.info.subjectName, 'CN=Compat Test Root', 'certificate info');
    await service.createOrUpdateIndividualEnrollment({
      registrationId: 'compat-x509-solo',
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: pki('compat-x509-solo.pem') } } } },
    });
  });
  const x509Register = (id, Transport, payload, files = id) =>
    registerWith(id, new X509Security(id, { cert: pki(`${files}.chain.pem`), key: pki(`${files}.key`) }), payload, { host, scope }, Transport);
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: X.509 group member with a chain, with a payload`, async () => {
      const id = `compat-x509-node-${name}`;
      const r = await x509Register(id, Transport, { modelId: 'x509' });
      eq(r.status, 'assigned', 'status');
      eq(r.deviceId, id, 'deviceId');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub}`);
      eq(r.x509, { enrollmentGroupId: x509Group }, 'registrationState.x509');
    });
  }
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: X.509 individual enrollment, self-signed`, async () => {
      const r = await x509Register('compat-x509-solo', Transport);
      eq(r.status, 'assigned', 'status');
      eq(r.deviceId, 'compat-x509-solo', 'deviceId');
      eq(r.x509, {}, 'registrationState.x509');
    });
  }
  // The refused ID is enrolled on the second pass, pinning the very certificate presented, so
  // that only the CN ≠ registration ID check can refuse it.
  const otherId = 'compat-x509-someone-else';
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: X.509 certificate whose CN is not the registration ID is refused (unknown ID, and enrolled with that certificate)`, async () => {
      const files = `compat-x509-node-${name}`;
      await rejects(x509Register(otherId, Transport, undefined, files), refusedCredential(name), 'wrong CN, not enrolled');
      await service.createOrUpdateIndividualEnrollment({
        registrationId: otherId,
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: pki(`${files}.pem`) } } } },
      });
      await rejects(x509Register(otherId, Transport, undefined, files), refusedCredential(name), 'wrong CN, enrolled with this certificate');
      await service.deleteIndividualEnrollment(otherId);
    });
  }
  // The Python suite brings its own X.509 group: this one would match its members first.
  await test('service: the X.509 group and individual enrollment are deleted', async () => {
    await service.deleteEnrollmentGroup(x509Group);
    await service.deleteIndividualEnrollment('compat-x509-solo');
    await rejects(service.getEnrollmentGroup(x509Group), (e) => eq(statusOf(e), 404, 'status'), 'X.509 group deleted');
    await rejects(service.getIndividualEnrollment('compat-x509-solo'), (e) => eq(statusOf(e), 404, 'status'), 'X.509 enrollment deleted');
  });

  // The strict server answers every register "assigning" with retry-after 1 s and logs each
  // answered poll (`operation polled`, debug level): the client must have polled, and not before
  // retry-after. The Node transports use retry-after instead of their own polling interval
  // (ProvisioningDeviceConstants.defaultPollingInterval, 2 s), so the first poll comes sooner.
  const { defaultPollingInterval } = require('azure-iot-provisioning-device').ProvisioningDeviceConstants;
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: polls the operation after retry-after when the server answers assigning first`, async () => {
      const strict = JSON.parse(fs.readFileSync(process.env.DPS_STRICT_CREDENTIALS, 'utf8'));
      const strictService = serviceFor(strict);
      const id = `${run}-strict-${name}`;
      const { responseBody: e } = await strictService.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      const target = { host: strict.hostName, scope: strict.idScope };
      const r = await register(id, e.attestation.symmetricKey.primaryKey, { poll: true }, target, Transport);
      eq(r.status, 'assigned', 'status after polling');
      eq(r.assignedHub, 'hub.localhost', 'placeholder hub');
      const events = logEvents(process.env.DPS_STRICT_LOG, id);
      const registered = events.filter((x) => x.message === 'registration');
      const polls = events.filter((x) => x.message === 'operation polled');
      eq(registered.length, 1, `one register in the log (${JSON.stringify(events)})`);
      assert(polls.length >= 1, `the client polled (${JSON.stringify(events)})`);
      const waited = polls[0].at - registered[0].at;
      assert(waited >= 1000, `the first poll came ${waited} ms after the register, before retry-after (1 s)`);
      assert(waited < defaultPollingInterval, `the first poll came ${waited} ms after the register: the SDK's own interval (${defaultPollingInterval} ms), not retry-after`);
      const { responseBody: s } = await strictService.getDeviceRegistrationState(id);
      eq(s.status, 'assigned', 'registration state');
    });
  }

  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: throttled (429 + retry-after), backs off and then registers`, async () => {
      const t = JSON.parse(fs.readFileSync(process.env.DPS_THROTTLED_CREDENTIALS, 'utf8'));
      const tService = serviceFor(t);
      const id = `${run}-throttled-${name}`;
      const { responseBody: e } = await tService.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      const key = e.attestation.symmetricKey.primaryKey;
      // Use up the device's allowance (one request per 2 s) over REST first.
      eq(await restRegister(t, id, key), 202, 'first register over REST');
      const target = { host: t.hostName, scope: t.idScope };
      let r;
      if (Transport === Http) {
        // Node HTTP 1.9.1 does not retry a throttled register: its REST client turns every
        // status >= 300 into an error before the transport's 429 branch can see it. It reports
        // a typed ThrottlingError with the response; the application waits Retry-After.
        let wait = 0;
        await rejects(
          register(id, key, undefined, target, Transport),
          (e) => {
            eq(e.name, 'ThrottlingError', 'typed error');
            wait = Number(e.response && e.response.headers['retry-after']);
            assert(wait >= 1, `retry-after header: ${wait}`);
          },
          'throttled register'
        );
        await new Promise((res) => setTimeout(res, wait * 1000));
        r = await register(id, key, undefined, target, Transport);
      } else {
        r = await register(id, key, undefined, target, Transport);
      }
      eq(r.status, 'assigned', 'the SDK registered after being throttled');
      const throttled = fs
        .readFileSync(process.env.DPS_THROTTLED_LOG, 'utf8')
        .split('\n')
        .filter((l) => l.includes('request throttled') && l.includes(`registration_id=${id} `));
      assert(throttled.length >= 1, `the server throttled the SDK's request (${throttled.length} in the log)`);
    });
  }

  console.log(`node: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  console.log(`not ok - node: suite crashed: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
