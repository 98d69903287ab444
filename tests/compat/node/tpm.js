// The official Node TPM client against a running dps, over HTTPS: npm azure-iot-provisioning-device +
// -device-http (`Http`) + azure-iot-security-tpm (`TpmSecurityClient`), unmodified, with a software
// TPM (swtpm behind tests/compat/tpm/mssim-shim.py, which speaks the Microsoft TPM simulator protocol
// that tss.js uses in simulator mode), and azure-iot-provisioning-service for the enrollments.
// Cases: the EK the client reads and the registration ID it derives; a TPM individual enrollment
// registers (401 challenge, import, SAS signed in the TPM, assigned, the final key imported); the
// feature's reference example (custom allocation, payload through the webhook); a wrong EK refused;
// a disabled enrollment; a second registration of the same device (a fresh challenge); the SAS of
// the previous challenge's key refused; polling a server that answers assigning first; no TPM
// enrollment groups.
//
// Run by tests/compat/run.sh with DPS_CREDENTIALS, DPS_STRICT_CREDENTIALS, DPS_MAIN_LOG,
// NODE_EXTRA_CA_CERTS, DPS_WEBHOOK_URL, DPS_TPM_SIMULATOR (host:port of the simulator bridge,
// default 127.0.0.1:2321) and DPS_TPM_OTHER_EK (base64 TPM2B_PUBLIC of another TPM's EK); run.sh
// checks the closing `tpm: P passed, F failed` line and the number of cases (tpm_cases).
// DPS_TPM_TRACE=1 prints what each registration got ('#' lines).
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const https = require('https');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { TpmSecurityClient } = require('azure-iot-security-tpm');
// tss.js is the TPM library azure-iot-security-tpm itself uses (its dependency, not ours).
const tss = require(require.resolve('tss.js', { paths: [path.dirname(require.resolve('azure-iot-security-tpm'))] }));
const shared = require('./check');

const creds = JSON.parse(fs.readFileSync(process.env.DPS_CREDENTIALS, 'utf8'));
const host = creds.hostName;
const scope = creds.idScope;
const hubs = creds.linkedHubs;
const run = `t${Date.now().toString(36)}`; // unique prefix per run
const [simHost, simPort] = (process.env.DPS_TPM_SIMULATOR || '127.0.0.1:2321').split(':');
const otherEk = process.env.DPS_TPM_OTHER_EK || '';

// Every SDK call is raced against CALL_TIMEOUT_MS (a promise that never settles would end node
// with exit code 0 in the middle of the suite).
const CALL_TIMEOUT_MS = 60000;
const within = (promise, what) => shared.within(promise, what, CALL_TIMEOUT_MS);
const service = ProvisioningServiceClient.fromConnectionString(creds.serviceConnectionString);
const svc = (what, promise) => within(promise, `service ${what}`);

let passed = 0;
let failed = 0;
let caseIds = []; // the registration IDs the running case enrolled, for its server log lines
let lastSeen = null; // what the running case's last registration got (registerTpm)
// azure-iot-security-tpm 1.9.3 reads each TPM response before it checks the response code
// (`innerWrapKey.length` after ActivateCredential, `idKeyPrivate.buffer` after Import, `hIdKey.handle`
// after Load): when the TPM refuses a command, the SDK throws a TypeError in a callback and its
// register() never settles. Such an exception fails the running case at once, with what it got.
let abortCase = null;
process.on('uncaughtException', (e) => {
  if (abortCase) return abortCase(e);
  console.log(`not ok - tpm: uncaught exception between cases: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
async function test(name, fn) {
  caseIds = [];
  lastSeen = null;
  const aborted = new Promise((_, reject) => {
    abortCase = (e) =>
      reject(
        new Error(
          `uncaught exception in the SDK, most likely the TPM refused a command (a bad authenticationKey blob if it was ` +
            `after ActivateCredential, Import or Load): ${e && e.stack ? e.stack : e}\n  the registration got: ${lastSeen && trace(lastSeen)}`
        )
      );
  });
  try {
    await Promise.race([fn(), aborted]);
    passed++;
    console.log(`ok - tpm: ${name}`);
  } catch (e) {
    failed++;
    console.log(`not ok - tpm: ${name}: ${e && e.stack ? e.stack : e}`);
    for (const line of serverLog(caseIds)) console.log(`#   dps: ${line}`);
  } finally {
    abortCase = null;
  }
}
// The main server's log lines that name one of `ids` (the last 40).
function serverLog(ids) {
  try {
    const lines = fs.readFileSync(process.env.DPS_MAIN_LOG, 'utf8').split('\n');
    return lines.filter((l) => ids.some((id) => l.includes(id))).slice(-40);
  } catch (_) {
    return [];
  }
}
const { assert, eq, rejects, statusOf } = shared;
function parseJson(text) {
  try {
    return typeof text === 'string' ? JSON.parse(text) : text;
  } catch (_) {
    return text;
  }
}

// A TpmSecurityClient on the simulator bridge (tss.js `new Tpm(true, host, port)`: the Microsoft
// simulator TCP protocol). Each one opens its own connection to the TPM, as a process would.
function tpmClient(registrationId) {
  return new TpmSecurityClient(registrationId, new tss.Tpm(true, simHost, Number(simPort)));
}
const call = (fn, what) => within(new Promise((res, rej) => fn((err, v) => (err ? rej(err) : res(v)))), what);
const endorsementKey = (security) => call((cb) => security.getEndorsementKey(cb), 'getEndorsementKey');
const registrationIdOf = (security) => call((cb) => security.getRegistrationId(cb), 'getRegistrationId');

// RFC 4648 base32, lower case, no padding: the registration ID the client derives from SHA-256(EK).
function base32(buf) {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of buf) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}
// The fields of an RSA TPM2B_PUBLIC (protocol.md §6.2) that the EK template fixes, and its modulus.
function parseRsaPublic(buf) {
  let pos = 0;
  const u16 = () => ((pos += 2), buf.readUInt16BE(pos - 2));
  const u32 = () => ((pos += 4), buf.readUInt32BE(pos - 4));
  const bytes = (n) => ((pos += n), buf.subarray(pos - n, pos));
  const size = u16();
  const t = { size, type: u16(), nameAlg: u16(), attributes: u32() };
  t.authPolicy = bytes(u16()).toString('hex');
  t.symmetric = [u16(), u16(), u16()];
  t.scheme = u16();
  t.keyBits = u16();
  t.exponent = u32();
  t.modulus = bytes(u16());
  t.rest = buf.length - pos;
  return t;
}
const EK_POLICY = '837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa';
function checkEkTemplate(ek, what) {
  const t = parseRsaPublic(ek);
  eq(
    [t.size + 2, t.type, t.nameAlg, t.attributes, t.authPolicy, t.symmetric, t.scheme, t.keyBits, t.exponent, t.modulus.length, t.rest],
    [ek.length, 0x0001, 0x000b, 0x000300b2, EK_POLICY, [0x0006, 128, 0x0043], 0x0010, 2048, 0, 256, 0],
    `${what}: TPM2B_PUBLIC of the standard RSA-2048 EK template`
  );
  return t;
}

// The result of a registration that must succeed; a failure says what the client saw.
async function registered(done, seen) {
  try {
    return await done;
  } catch (err) {
    throw new Error(`register failed: ${err.name}: ${err.message}; ${trace(seen)}`);
  }
}

// One registration through the official client, with observers that pass everything through
// unchanged: `legs` are the transport's PUT …/register answers (before or after the client
// set its TPM-signed SAS), `polls` its GET …/operations answers, `imports` the blobs the client
// gave its TPM (activateIdentityKey: the 401 challenge's, then the assigned answer's) and their
// outcome, `sas` the token the client built with the imported key.
function registerTpm(security, payload, target = { host, scope }) {
  const transport = new Http();
  const seen = { legs: [], polls: [], imports: [], sas: null };
  lastSeen = seen;
  const observe = (list, authorized) => (err, result, response) => {
    list.push(
      err
        ? { authorized, status: statusOf(err), body: parseJson(err.responseBody), error: `${err.name}: ${err.message}` }
        : { authorized, status: response && response.statusCode, body: result }
    );
  };
  const registrationRequest = transport.registrationRequest.bind(transport);
  transport.registrationRequest = (request, callback) =>
    registrationRequest(request, (...args) => {
      observe(seen.legs, seen.sas !== null)(...args);
      callback(...args);
    });
  const queryOperationStatus = transport.queryOperationStatus.bind(transport);
  transport.queryOperationStatus = (request, operationId, callback) =>
    queryOperationStatus(request, operationId, (...args) => {
      observe(seen.polls, true)(...args);
      callback(...args);
    });
  const respond = transport.respondToAuthenticationChallenge.bind(transport);
  transport.respondToAuthenticationChallenge = (request, sasToken, callback) => {
    seen.sas = sasToken;
    respond(request, sasToken, callback);
  };
  const activate = security.activateIdentityKey.bind(security);
  security.activateIdentityKey = (blob, callback) => {
    const entry = { blob: Buffer.from(blob), error: undefined };
    seen.imports.push(entry);
    activate(blob, (err, ...rest) => {
      entry.error = err ? `${err.name}: ${err.message}` : null;
      callback(err, ...rest);
    });
  };
  const client = ProvisioningDeviceClient.create(target.host, target.scope, transport, security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  const done = within(client.register(), 'TPM register over Http').finally(() => {
    security.activateIdentityKey = activate;
    if (process.env.DPS_TPM_TRACE) console.log(`# ${security._registrationId}: ${trace(seen)}`);
  });
  return { done, seen };
}
// What a registration got, for messages: answers with their blobs shortened.
const trace = (seen) =>
  JSON.stringify(
    {
      legs: seen.legs.map(({ authorized, status, body, error }) => (typeof body === 'object' ? { authorized, status, body } : { authorized, status, body, error })),
      polls: seen.polls.map(({ status, body }) => ({ status, body })),
      imports: seen.imports.map((i) => ({ bytes: i.blob.length, error: i.error })),
    },
    (key, value) => (key === 'authenticationKey' && typeof value === 'string' ? `<${Buffer.from(value, 'base64').length} bytes>` : value)
  );
// The first leg: a 401 whose body is the challenge (protocol.md §6.3), without `status`.
function checkChallenge(seen) {
  assert(seen.legs.length >= 1, `the client sent its first PUT: ${trace(seen)}`);
  const first = seen.legs[0];
  eq([first.authorized, first.status], [false, 401], `the first PUT (no Authorization) is answered 401: ${trace(seen)}`);
  const body = first.body || {};
  assert(typeof body.authenticationKey === 'string' && body.authenticationKey.length > 0, `401 body has authenticationKey: ${trace(seen)}`);
  eq(body.keyName, 'registration', 'keyName of the challenge (the C SDK requires it)');
  assert(!('status' in body), `the challenge has no status field: ${JSON.stringify(body)}`);
  return body.authenticationKey;
}
// A successful TPM registration: challenge imported, SAS accepted, assigned answer's key imported.
function checkAssigned(r, seen, registrationId, linkedHubs = hubs) {
  const challenge = checkChallenge(seen);
  assert(seen.legs.length >= 2 && seen.legs[1].authorized, `a second PUT with the TPM-signed SAS: ${trace(seen)}`);
  assert([200, 202].includes(seen.legs[1].status), `the signed PUT is accepted (200/202): ${trace(seen)}`);
  assert(/^SharedAccessSignature sr=.+&sig=.+&se=\d+&skn=registration$/.test(seen.sas), `SAS form: ${seen.sas}`);
  eq(r.status, 'assigned', 'status');
  const state = r.registrationState || {};
  eq(state.registrationId, registrationId, 'registrationState.registrationId');
  eq(state.status, 'assigned', 'registrationState.status');
  assert(linkedHubs.includes(state.assignedHub), `assignedHub ${state.assignedHub} is a linked hub`);
  assert(state.tpm && typeof state.tpm.authenticationKey === 'string', `registrationState.tpm.authenticationKey: ${JSON.stringify(state)}`);
  eq(
    seen.imports.map((i) => [i.blob.toString('base64'), i.error]),
    [
      [challenge, null],
      [state.tpm.authenticationKey, null],
    ],
    'the client imported the challenge, then the assigned answer\'s authenticationKey, both without error'
  );
  return state;
}
// PUT …/register over plain HTTPS with a given SAS (no SDK); resolves with [status, body].
function restRegister(registrationId, sas) {
  const answered = new Promise((resolve, reject) => {
    const req = https.request(
      {
        host,
        port: 443,
        method: 'PUT',
        path: `/${scope}/registrations/${registrationId}/register?api-version=2019-03-31`,
        headers: { authorization: sas, 'content-type': 'application/json' },
      },
      (res) => {
        let body = '';
        res.on('data', (c) => (body += c));
        res.on('end', () => resolve([res.statusCode, parseJson(body)]));
      }
    );
    req.on('error', reject);
    req.end(JSON.stringify({ registrationId }));
  });
  return within(answered, `REST register ${registrationId}`);
}
function tpmEnrollment(registrationId, ek, extra = {}, client = service) {
  caseIds.push(registrationId);
  return svc(
    `create TPM enrollment ${registrationId}`,
    client.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: { type: 'tpm', tpm: { endorsementKey: ek } },
      provisioningStatus: 'enabled',
      ...extra,
    })
  ).then(({ responseBody }) => responseBody);
}

async function main() {
  const started = Date.now();
  let ek; // base64 TPM2B_PUBLIC, as the client sends it
  let derivedId;
  await test('the client reads the EK through the simulator bridge and derives its registration ID', async () => {
    const security = tpmClient();
    const ekBytes = await endorsementKey(security);
    const mine = checkEkTemplate(ekBytes, 'this TPM\'s EK');
    ek = ekBytes.toString('base64');
    derivedId = await registrationIdOf(security);
    eq(derivedId, base32(crypto.createHash('sha256').update(ekBytes).digest()), 'registration ID = base32(SHA-256(EK))');
    const srk = await call((cb) => security.getStorageRootKey(cb), 'getStorageRootKey');
    eq(parseRsaPublic(srk).attributes, 0x00030472, 'SRK attributes');
    const other = checkEkTemplate(Buffer.from(otherEk, 'base64'), 'the other TPM\'s EK (DPS_TPM_OTHER_EK)');
    assert(!other.modulus.equals(mine.modulus), 'the other TPM has another EK');
    // A second client on the same TPM reads the same (persisted) EK.
    eq((await endorsementKey(tpmClient())).toString('base64'), ek, 'EK of a second client');
  });

  let first; // case a: { hub, sas, challenge }
  await test('individual enrollment: 401 challenge, signed SAS, assigned, authenticationKey imported', async () => {
    const e = await tpmEnrollment(derivedId, ek, { deviceId: `${run}-device` });
    eq([e.registrationId, e.attestation.type], [derivedId, 'tpm'], 'enrollment stored');
    assert(e.attestation.tpm && e.attestation.tpm.endorsementKey, `endorsementKey returned: ${JSON.stringify(e.attestation)}`);
    const security = tpmClient();
    const { done, seen } = registerTpm(security);
    const r = await registered(done, seen);
    const state = checkAssigned(r, seen, derivedId);
    eq(state.deviceId, `${run}-device`, 'deviceId from the enrollment');
    // The imported key signs (what the device then does for its IoT Hub SAS).
    const sig = await call((cb) => security.signWithIdentity(Buffer.from('hub-token'), cb), 'signWithIdentity');
    eq(sig.length, 32, 'HMAC-SHA256 with the imported key');
    const { responseBody: s } = await svc('registration state', service.getDeviceRegistrationState(derivedId));
    eq([s.registrationId, s.status, s.assignedHub], [derivedId, 'assigned', state.assignedHub], 'the service\'s registration state');
    first = { hub: state.assignedHub, sas: seen.sas, challenge: seen.legs[0].body.authenticationKey };
  });

  await test('custom allocation (the feature\'s reference example): payload through the webhook', async () => {
    const id = `${run}-custom`;
    await tpmEnrollment(id, ek, {
      allocationPolicy: 'custom',
      customAllocationDefinition: { webhookUrl: process.env.DPS_WEBHOOK_URL, apiVersion: '2019-03-31' },
    });
    const payload = { modelId: 'dtmi:contoso:thermostat;1', custom: { n: 1, s: 'x' } };
    const { done, seen } = registerTpm(tpmClient(id), payload);
    const r = await registered(done, seen);
    const state = checkAssigned(r, seen, id);
    eq(state.assignedHub, hubs[hubs.length - 1], 'the webhook chose the last linked hub');
    eq(state.payload, { echo: payload, group: null }, 'registrationState.payload from the webhook');
  });

  await test('wrong EK: an enrollment with another TPM\'s EK is refused (401, no challenge)', async () => {
    const id = `${run}-wrong-ek`;
    await tpmEnrollment(id, otherEk);
    const { done, seen } = registerTpm(tpmClient(id));
    // The client turns a 401 without authenticationKey into a FormatError (http.js
    // getAuthenticationChallenge) and stops: nothing is imported, no second PUT.
    await rejects(
      done,
      (err) => {
        eq(`${err.name}: ${err.message}`, 'FormatError: The server did NOT respond with an appropriately formatted authentication blob.', 'client error');
      },
      'wrong EK'
    );
    eq(seen.legs.length, 1, `one PUT only: ${trace(seen)}`);
    const leg = seen.legs[0];
    eq([leg.authorized, leg.status], [false, 401], `answered 401: ${trace(seen)}`);
    assert(leg.body && !('authenticationKey' in leg.body), `no authenticationKey for a wrong EK: ${trace(seen)}`);
    eq(Math.floor(leg.body.errorCode / 1000), 401, `a 401xxx DPS error body: ${trace(seen)}`);
    eq(seen.imports.length, 0, 'nothing imported');
  });

  await test('disabled enrollment: challenge and proof, then status disabled', async () => {
    const id = `${run}-disabled`;
    await tpmEnrollment(id, ek, { provisioningStatus: 'disabled' });
    const { done, seen } = registerTpm(tpmClient(id));
    // The Node polling state machine knows assigned/assigning/failed; any other status ends the
    // register with a SyntaxError `status is <status>` carrying the result.
    await rejects(
      done,
      (err) => {
        eq(`${err.name}: ${err.message}`, 'SyntaxError: status is disabled', `client error (${trace(seen)})`);
        eq(err.result && err.result.status, 'disabled', 'result.status');
      },
      'disabled'
    );
    checkChallenge(seen);
    eq(seen.imports.map((i) => i.error), [null], 'the challenge imported, nothing else');
    assert(seen.legs.length >= 2 && seen.legs[1].authorized, `the signed PUT was sent: ${trace(seen)}`);
  });

  let second;
  await test('the same device registers again: a fresh challenge, re-imported, assigned', async () => {
    assert(first, 'the individual enrollment case registered');
    caseIds.push(derivedId);
    const { done, seen } = registerTpm(tpmClient());
    const r = await registered(done, seen);
    const state = checkAssigned(r, seen, derivedId);
    eq(state.assignedHub, first.hub, 'same hub');
    assert(seen.legs[0].body.authenticationKey !== first.challenge, 'a fresh challenge');
    second = { sas: seen.sas };
  });

  await test('the SAS signed with the previous challenge\'s key is refused, the current one accepted', async () => {
    assert(first && second, 'both registrations ran');
    caseIds.push(derivedId);
    const [staleStatus, staleBody] = await restRegister(derivedId, first.sas);
    eq(staleStatus, 401, `stale key (${JSON.stringify(staleBody)})`);
    const [status, body] = await restRegister(derivedId, second.sas);
    assert([200, 202].includes(status), `current key: ${status} ${JSON.stringify(body)}`);
  });

  // The strict server answers every register "assigning" (retry-after 1 s): the client polls
  // with its TPM-signed SAS, and the poll's assigned answer carries the key it imports.
  await test('a server that answers assigning first: the client polls with its TPM SAS', async () => {
    const strict = JSON.parse(fs.readFileSync(process.env.DPS_STRICT_CREDENTIALS, 'utf8'));
    const id = `${run}-strict`;
    await tpmEnrollment(id, ek, {}, ProvisioningServiceClient.fromConnectionString(strict.serviceConnectionString));
    const { done, seen } = registerTpm(tpmClient(id), undefined, { host: strict.hostName, scope: strict.idScope });
    const r = await registered(done, seen);
    eq([seen.legs.length, seen.legs[1].status, seen.legs[1].body.status], [2, 202, 'assigning'], `the signed PUT is answered assigning: ${trace(seen)}`);
    assert(seen.polls.length >= 1 && seen.polls.every((p) => p.status === 200), `the client polled: ${trace(seen)}`);
    eq(seen.polls[seen.polls.length - 1].body, r, 'the result is the last poll\'s answer');
    checkAssigned(r, seen, id, strict.linkedHubs && strict.linkedHubs.length ? strict.linkedHubs : ['hub.localhost']);
  });

  await test('service: a TPM enrollment group is refused with 400 400004', async () => {
    await rejects(
      svc(
        'create TPM group',
        service.createOrUpdateEnrollmentGroup({ enrollmentGroupId: `${run}-group`, attestation: { type: 'tpm', tpm: { endorsementKey: ek } } })
      ),
      (err) => {
        const body = parseJson(err.responseBody) || {};
        eq([statusOf(err), body.errorCode], [400, 400004], `status and errorCode (${err.name}: ${err.message})`);
      },
      'TPM group'
    );
  });

  console.log(`# tpm: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`tpm: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  console.log(`not ok - tpm: suite crashed: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
