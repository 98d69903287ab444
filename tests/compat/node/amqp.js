// The official Node device client over AMQP against a running dps: npm azure-iot-provisioning-device
// + -device-amqp 1.9.1 (`Amqp`: AMQP 1.0 over TLS on 5671; `AmqpWs`: AMQP over WebSocket on 443,
// `wss://<host>:443/$iothub/websocket`, subprotocol AMQPWSB10), unmodified, with
// azure-iot-security-symmetric-key, -x509 and -tpm (against swtpm behind tests/compat/tpm/mssim-shim.py),
// and azure-iot-provisioning-service for the enrollments. Over both transports: an individual
// symmetric-key enrollment whose payload comes back through the custom allocation webhook; a
// group-derived key; an X.509 individual enrollment and an X.509 group member with a leaf +
// intermediate chain (no SASL layer); a TPM individual enrollment (SASL mechanism TPM) with a payload
// through the webhook; polling a server that answers assigning first; a wrong key refused at SASL
// (outcome auth); a disabled enrollment (an accepted `disabled` answer).
//
// Run by tests/compat/run.sh with DPS_CREDENTIALS, DPS_STRICT_CREDENTIALS, DPS_STRICT_LOG,
// DPS_MAIN_LOG, DPS_WEBHOOK_URL, DPS_PKI, DPS_TPM_SIMULATOR and NODE_EXTRA_CA_CERTS, against dps
// servers listening on 5671 (AMQP) and 443 (AMQP over WebSocket); run.sh checks the closing
// `amqp: P passed, F failed` line and the number of cases (amqp_cases).
// DPS_AMQP_TRACE=1 prints what each registration got ('#' lines); DEBUG=rhea:frames,rhea:raw shows
// the AMQP frames, DEBUG=azure-iot-provisioning-device-amqp:* the transport's state machine.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { TpmSecurityClient } = require('azure-iot-security-tpm');
// The SASL TPM mechanism of the AMQP transport (its own module, which amqp.js requires): observed,
// not changed, to see the challenges the server sends.
const { SaslTpm } = require('azure-iot-provisioning-device-amqp/dist/sasl_tpm');
// tss.js is the TPM library azure-iot-security-tpm itself uses (its dependency, not ours).
const tss = require(require.resolve('tss.js', { paths: [path.dirname(require.resolve('azure-iot-security-tpm'))] }));
const shared = require('./check');
const { assert, eq, rejects, statusOf } = shared;

const creds = JSON.parse(fs.readFileSync(process.env.DPS_CREDENTIALS, 'utf8'));
const host = creds.hostName;
const scope = creds.idScope;
const hubs = creds.linkedHubs;
const run = `a${Date.now().toString(36)}`; // unique prefix per run
const [simHost, simPort] = (process.env.DPS_TPM_SIMULATOR || '127.0.0.1:2321').split(':');
const { defaultPollingInterval } = require('azure-iot-provisioning-device').ProvisioningDeviceConstants;

// No SDK call has a deadline of its own that always fires (the SDK's 30 s request timer does not
// cover connecting, SASL or attaching), and a promise that never settles ends node with exit code 0
// in the middle of the suite: every SDK call is raced against CALL_TIMEOUT_MS, and every case
// against CASE_TIMEOUT_MS, so that a server that hangs fails each case in bounded time (the whole
// suite within run.sh's suite_timeout).
const CALL_TIMEOUT_MS = 20000;
const CASE_TIMEOUT_MS = 30000;
const within = (promise, what, ms = CALL_TIMEOUT_MS) => shared.within(promise, what, ms);
const timed = (target, what) => shared.timed(target, what, CALL_TIMEOUT_MS);
const serviceFor = (c) => timed(ProvisioningServiceClient.fromConnectionString(c.serviceConnectionString), `service ${c.hostName}`);
const service = serviceFor(creds);

let passed = 0;
let failed = 0;
let caseIds = []; // the registration IDs the running case used, for its server log lines
let lastSeen = null; // what the running case's last registration got (observe())
// An exception the SDK throws in one of its callbacks (azure-iot-security-tpm reads TPM responses
// before it checks them; the AMQP transport emits 'error' when nobody waits for its callback; it
// reads `registrationState.tpm.authenticationKey` of the TPM answer unchecked) would leave the
// register() promise unsettled: it fails the running case at once, with what the case got.
let abortCase = null;
const uncaught = (e) => {
  if (abortCase) return abortCase(e);
  console.log(`not ok - amqp: uncaught exception between cases: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
};
process.on('uncaughtException', uncaught);
process.on('unhandledRejection', uncaught);
async function test(name, fn) {
  caseIds = [];
  lastSeen = null;
  let timer;
  const aborted = new Promise((_, reject) => {
    abortCase = (e) =>
      reject(new Error(`uncaught exception in the SDK: ${e && e.stack ? e.stack : e}\n  the registration got: ${lastSeen && trace(lastSeen)}`));
    timer = setTimeout(() => reject(new Error(`the case did not end within ${CASE_TIMEOUT_MS / 1000} s`)), CASE_TIMEOUT_MS);
  });
  try {
    await Promise.race([fn(), aborted]);
    passed++;
    console.log(`ok - amqp: ${name}`);
  } catch (e) {
    failed++;
    console.log(`not ok - amqp: ${name}: ${e && e.stack ? e.stack : e}`);
    if (lastSeen) console.log(`#   the last registration got: ${trace(lastSeen)}`);
    for (const line of serverLog(caseIds)) console.log(`#   dps: ${line}`);
  } finally {
    clearTimeout(timer);
    abortCase = null;
  }
}
// The servers' log lines that name one of `ids` (the last 40).
function serverLog(ids) {
  const lines = [];
  for (const file of [process.env.DPS_MAIN_LOG, process.env.DPS_STRICT_LOG]) {
    try {
      lines.push(...fs.readFileSync(file, 'utf8').split('\n').filter((l) => ids.some((id) => l.includes(id))));
    } catch (_) {
      // no log
    }
  }
  return lines.slice(-40);
}
// One registration's events in a server log (tracing's default format: RFC 3339 time, level,
// target, then the message and its key=value fields): [{ at: ms since the epoch, message }].
function logEvents(file, registrationId) {
  const line = /^(\S+)\s+[A-Z]+\s+(?:\S+\{[^}]*\}: )*\S+: (.*?) registration_id="?([^"\s]+)"?(?: |$)/;
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .map((l) => line.exec(l))
    .filter((m) => m && m[3] === registrationId)
    .map((m) => ({ at: Date.parse(m[1]), message: m[2] }));
}
function deriveKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}
const pki = (f) => fs.readFileSync(`${process.env.DPS_PKI}/${f}`, 'utf8');

// The SASL TPM exchange of the running registration: each challenge the server sent (observed in
// SaslTpm.step, then passed on unchanged).
let saslChallenges = null;
const step = SaslTpm.prototype.step;
SaslTpm.prototype.step = function (challenge, callback) {
  if (saslChallenges) saslChallenges.push(Buffer.from(challenge));
  return step.call(this, challenge, callback);
};

// What one registration got, through observers that pass everything on unchanged: `answers` are
// the transport's callbacks for its register and poll requests (error, or the parsed JSON body and
// the AMQP message's correlation-id and application properties); for TPM, `imports` are the blobs
// the client gave its TPM (the SASL challenge's, then the assigned answer's) and their outcome, and
// `challenges` the SASL challenges.
function observe(transport, security) {
  const seen = { answers: [], imports: [], challenges: [], connections: [] };
  lastSeen = seen;
  // The rhea connections the transport opens (azure-iot-amqp-base's container), to read the
  // SASL failure rhea recorded on one (`transport_error`), which the transport does not pass on.
  const container = transport._amqpBase && transport._amqpBase._rheaContainer;
  if (container) {
    const connect = container.connect.bind(container);
    container.connect = (options) => {
      const connection = connect(options);
      seen.connections.push(connection);
      return connection;
    };
  }
  const record = (op) => (err, result, msg) => {
    seen.answers.push(
      err
        ? { op, error: `${err.name}: ${err.message}`, condition: err.condition, description: err.description }
        : {
            op,
            body: result,
            correlationId: msg ? msg.correlation_id : undefined,
            applicationProperties: msg ? msg.application_properties : undefined,
          }
    );
  };
  const registrationRequest = transport.registrationRequest.bind(transport);
  transport.registrationRequest = (request, callback) =>
    registrationRequest(request, (...args) => {
      record('register')(...args);
      callback(...args);
    });
  const queryOperationStatus = transport.queryOperationStatus.bind(transport);
  transport.queryOperationStatus = (request, operationId, callback) =>
    queryOperationStatus(request, operationId, (...args) => {
      record('poll')(...args);
      callback(...args);
    });
  if (security && security.activateIdentityKey) {
    const activate = security.activateIdentityKey.bind(security);
    security.activateIdentityKey = (blob, callback) => {
      const entry = { blob: Buffer.from(blob), error: undefined };
      seen.imports.push(entry);
      activate(blob, (err, ...rest) => {
        entry.error = err ? `${err.name}: ${err.message}` : null;
        callback(err, ...rest);
      });
    };
  }
  return seen;
}
const trace = (seen) =>
  JSON.stringify(
    {
      answers: seen.answers,
      challenges: seen.challenges.map((c) => ({ bytes: c.length, control: c.length ? `0x${c[0].toString(16).padStart(2, '0')}` : null })),
      imports: seen.imports.map((i) => ({ bytes: i.blob.length, error: i.error })),
      saslErrors: saslErrors(seen),
    },
    (key, value) => (key === 'authenticationKey' && typeof value === 'string' ? `<${Buffer.from(value, 'base64').length} bytes>` : value)
  );

// The SASL failures rhea recorded on the registration's connections: [name, message, condition].
const saslErrors = (seen) =>
  seen.connections.filter((c) => c.transport_error).map(({ transport_error: e }) => [e.name, e.message, e.condition]);

// register() of the device SDK over `Transport`, under within(): resolves with what it resolves
// (registrationState for keys and X.509, the whole RegistrationResult for TPM); `seen` is filled.
function registerWith(registrationId, security, payload, Transport, target = { host, scope }) {
  caseIds.push(registrationId);
  const transport = new Transport();
  const seen = observe(transport, security);
  const client = ProvisioningDeviceClient.create(target.host, target.scope, transport, security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  const isTpm = !!security.getEndorsementKey;
  if (isTpm) saslChallenges = seen.challenges;
  const done = within(client.register(), `register ${registrationId} over ${Transport.name}`).finally(() => {
    if (isTpm) saslChallenges = null;
    if (process.env.DPS_AMQP_TRACE) console.log(`# ${registrationId} over ${Transport.name}: ${trace(seen)}`);
  });
  return { done, seen };
}
const registerKey = (id, key, payload, Transport, target) => registerWith(id, new SymmetricKeySecurityClient(id, key), payload, Transport, target);
const registerX509 = (id, files, payload, Transport) =>
  registerWith(id, new X509Security(id, { cert: pki(`${files}.chain.pem`), key: pki(`${files}.key`) }), payload, Transport);
// A registration that must succeed; a failure says what the client saw.
async function registered({ done, seen }) {
  try {
    return await done;
  } catch (err) {
    const last = seen.answers[seen.answers.length - 1];
    const final = last && last.body && !['assigning', 'registering'].includes(last.body.status);
    // register() settles only after the transport's disconnect, which waits for the server's
    // detach, end and close replies (azure-iot-amqp-base forces them after 45 s).
    const hint = final ? ' (the final answer came, but register() did not settle: did the server answer the detach, end and close?)' : '';
    throw new Error(`register failed: ${err && err.name}: ${err && err.message}${hint}; ${trace(seen)}`);
  }
}
// Every answer of a successful registration carried its request's correlation-id (the client matches
// on it) and a JSON body with a status.
function checkAnswers(seen) {
  assert(seen.answers.length >= 1 && seen.answers.every((a) => !a.error), `answers without error: ${trace(seen)}`);
  for (const a of seen.answers) {
    assert(typeof a.correlationId === 'string' && a.correlationId.length > 0, `correlation-id on every answer: ${trace(seen)}`);
    assert(a.body && typeof a.body.status === 'string', `a RegistrationOperationStatus body: ${trace(seen)}`);
  }
}

const TRANSPORTS = [['amqp', Amqp], ['amqpws', AmqpWs]];

async function main() {
  const started = Date.now();

  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: individual key enrollment, payload through the custom allocation webhook`, async () => {
      const id = `${run}-${name}-ind`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        deviceId: `${id}-device`,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
        allocationPolicy: 'custom',
        customAllocationDefinition: { webhookUrl: process.env.DPS_WEBHOOK_URL, apiVersion: '2021-10-01' },
      });
      const payload = { modelId: 'dtmi:compat:amqp;1', transport: name, nested: { n: [1, 2], s: 'x' } };
      const reg = registerKey(id, e.attestation.symmetricKey.primaryKey, payload, Transport);
      const r = await registered(reg);
      checkAnswers(reg.seen);
      eq([r.registrationId, r.status], [id, 'assigned'], 'registrationId and status');
      eq(r.deviceId, `${id}-device`, 'deviceId from the enrollment');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub} is a linked hub`);
      eq(r.assignedHub, hubs[hubs.length - 1], 'the webhook chose the last linked hub');
      eq(r.payload, { echo: payload, group: null }, 'registrationState.payload from the webhook');
      const again = await registered(registerKey(id, e.attestation.symmetricKey.secondaryKey, undefined, Transport));
      eq([again.status, again.assignedHub], ['assigned', r.assignedHub], 'the secondary key, no payload: assigned to the same hub');
      const { responseBody: s } = await service.getDeviceRegistrationState(id);
      eq([s.status, s.assignedHub], ['assigned', r.assignedHub], 'the service sees the registration');
      await service.deleteIndividualEnrollment(id);
    });

    await test(`device ${name}: group member with a derived key`, async () => {
      const gid = `${run}-${name}-grp`;
      const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: gid,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      const id = `${run}-${name}-member`;
      const reg = registerKey(id, deriveKey(g.attestation.symmetricKey.primaryKey, id), { fw: '1.0' }, Transport);
      const r = await registered(reg);
      checkAnswers(reg.seen);
      eq([r.registrationId, r.status], [id, 'assigned'], 'registrationId and status');
      eq(r.deviceId, id, 'group members use the registration ID as device ID');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub} is a linked hub`);
      const { responseBody: s } = await service.getDeviceRegistrationState(id);
      eq([s.status, s.assignedHub], ['assigned', r.assignedHub], 'the service sees the group registration');
      await service.deleteEnrollmentGroup(gid);
    });
  }

  // X.509: no SASL layer, the identity is the TLS client certificate (leaf + intermediate, issued
  // by run.sh's PKI). Individual enrollments pin the leaf; the group is on the root CA, which
  // run.sh put in the certificate store as verified.
  const x509Group = `${run}-x509`;
  let groupMade = null;
  const x509GroupOnce = () =>
    (groupMade =
      groupMade ||
      service.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: x509Group,
        attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: pki('root.pem') } } } },
      }));
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: X.509 individual enrollment, leaf + intermediate chain`, async () => {
      const id = `compat-x509-node-${name}`;
      await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: pki(`${id}.pem`) } } } },
      });
      const reg = registerX509(id, id, undefined, Transport);
      const r = await registered(reg);
      checkAnswers(reg.seen);
      eq([r.registrationId, r.status, r.deviceId], [id, 'assigned', id], 'registrationId, status, deviceId');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub} is a linked hub`);
      eq(r.x509, {}, 'registrationState.x509 of an individual enrollment');
      await service.deleteIndividualEnrollment(id);
    });
    await test(`device ${name}: X.509 group member with a chain, with a payload`, async () => {
      const { responseBody: g } = await x509GroupOnce();
      eq(g.attestation.x509.signingCertificates.primary.info.subjectName, 'CN=Compat Test Root', 'group certificate info');
      const id = `compat-x509-node-${name}-member`;
      const reg = registerX509(id, id, { modelId: 'x509' }, Transport);
      const r = await registered(reg);
      checkAnswers(reg.seen);
      eq([r.registrationId, r.status, r.deviceId], [id, 'assigned', id], 'registrationId, status, deviceId');
      assert(hubs.includes(r.assignedHub), `assignedHub ${r.assignedHub} is a linked hub`);
      eq(r.x509, { enrollmentGroupId: x509Group }, 'registrationState.x509');
    });
  }

  // TPM: SASL mechanism TPM (sasl-init 0 scope 0 id 0 EK; challenge 0x00; response 0 SRK; the
  // authentication blob in segments, 0x80 … then 0xC1 … (protocol.md §5.2); response 0 SAS), then
  // the register message, whose assigned answer carries registrationState.tpm.authenticationKey,
  // which the client imports into its TPM.
  let ek;
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: TPM individual enrollment (SASL TPM), payload through the webhook`, async () => {
      if (!ek) {
        const security = new TpmSecurityClient(undefined, new tss.Tpm(true, simHost, Number(simPort)));
        ek = (await within(new Promise((res, rej) => security.getEndorsementKey((err, v) => (err ? rej(err) : res(v)))), 'getEndorsementKey')).toString('base64');
      }
      const id = `${run}-tpm-${name}`;
      await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'tpm', tpm: { endorsementKey: ek } },
        allocationPolicy: 'custom',
        customAllocationDefinition: { webhookUrl: process.env.DPS_WEBHOOK_URL, apiVersion: '2021-10-01' },
      });
      const security = new TpmSecurityClient(id, new tss.Tpm(true, simHost, Number(simPort)));
      const payload = { modelId: 'dtmi:contoso:thermostat;1', transport: name };
      const reg = registerWith(id, security, payload, Transport);
      const r = await registered(reg);
      const { seen } = reg;
      checkAnswers(seen);
      eq(r.status, 'assigned', 'status');
      const state = r.registrationState || {};
      eq([state.registrationId, state.status], [id, 'assigned'], 'registrationState.registrationId and status');
      assert(hubs.includes(state.assignedHub), `assignedHub ${state.assignedHub} is a linked hub`);
      eq(state.assignedHub, hubs[hubs.length - 1], 'the webhook chose the last linked hub');
      eq(state.payload, { echo: payload, group: null }, 'registrationState.payload from the webhook');
      assert(state.tpm && typeof state.tpm.authenticationKey === 'string', `registrationState.tpm.authenticationKey: ${JSON.stringify(state)}`);
      // The SASL exchange: a one-byte 0x00 challenge (asks for the SRK), then the blob in segments
      // whose control bytes are 0x80 (seq 0) … and 0xC1 (final, seq 1), as protocol.md §5.2 requires
      // for all SDKs (Node itself takes any number of segments).
      const ch = seen.challenges;
      assert(ch.length >= 2, `SASL challenges: ${trace(seen)}`);
      eq(ch[0].toString('hex'), '00', 'the first challenge is the single byte 0x00');
      eq(ch.slice(1).map((c) => c[0]), [0x80, 0xc1], `control bytes of the blob segments: ${trace(seen)}`);
      const blob = Buffer.concat(ch.slice(1).map((c) => c.subarray(1)));
      eq(
        seen.imports.map((i) => [i.blob.toString('base64'), i.error]),
        [
          [blob.toString('base64'), null],
          [state.tpm.authenticationKey, null],
        ],
        'the client imported the SASL challenge\'s blob, then the assigned answer\'s authenticationKey, both without error'
      );
      // The imported key signs (what the device then does for its IoT Hub SAS).
      const sig = await within(new Promise((res, rej) => security.signWithIdentity(Buffer.from('hub-token'), (err, v) => (err ? rej(err) : res(v)))), 'signWithIdentity');
      eq(sig.length, 32, 'HMAC-SHA256 with the imported key');
      await service.deleteIndividualEnrollment(id);
    });
  }

  // The strict server answers every register "assigning" with retry-after 1 s and logs each
  // answered poll (`operation polled`, debug level): the client must have polled, and not before
  // retry-after. The AMQP transport uses the answer's `retry-after` application property (else its
  // own polling interval, ProvisioningDeviceConstants.defaultPollingInterval, 2 s).
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: polls the operation after retry-after when the server answers assigning first`, async () => {
      const strict = JSON.parse(fs.readFileSync(process.env.DPS_STRICT_CREDENTIALS, 'utf8'));
      const strictService = serviceFor(strict);
      const id = `${run}-strict-${name}`;
      const { responseBody: e } = await strictService.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      const reg = registerKey(id, e.attestation.symmetricKey.primaryKey, { poll: true }, Transport, { host: strict.hostName, scope: strict.idScope });
      const r = await registered(reg);
      const { seen } = reg;
      checkAnswers(seen);
      eq(r.status, 'assigned', 'status after polling');
      eq(r.assignedHub, 'hub.localhost', 'placeholder hub');
      eq([seen.answers[0].op, seen.answers[0].body.status], ['register', 'assigning'], `the register is answered assigning: ${trace(seen)}`);
      assert(seen.answers.slice(1).every((a) => a.op === 'poll') && seen.answers.length >= 2, `then polls: ${trace(seen)}`);
      const retryAfter = (seen.answers[0].applicationProperties || {})['retry-after'];
      eq(Number(retryAfter), 1, `the assigning answer's retry-after application property (${JSON.stringify(seen.answers[0].applicationProperties)})`);
      const events = logEvents(process.env.DPS_STRICT_LOG, id);
      const registeredEvents = events.filter((x) => x.message === 'registration');
      const polls = events.filter((x) => x.message === 'operation polled');
      eq(registeredEvents.length, 1, `one register in the log (${JSON.stringify(events)})`);
      assert(polls.length >= 1, `the client polled (${JSON.stringify(events)})`);
      const waited = polls[0].at - registeredEvents[0].at;
      assert(waited >= 1000, `the first poll came ${waited} ms after the register, before retry-after (1 s)`);
      assert(waited < defaultPollingInterval, `the first poll came ${waited} ms after the register: the SDK's own interval (${defaultPollingInterval} ms), not retry-after`);
      const { responseBody: s } = await strictService.getDeviceRegistrationState(id);
      eq(s.status, 'assigned', 'registration state');
    });
  }

  // A wrong key fails SASL PLAIN with sasl-outcome `auth` (code 1). rhea records it on the
  // connection as a ConnectionError 'Failed to authenticate: 1' (amqp:unauthorized-access), but
  // azure-iot-amqp-base reads the connection's remote close error instead, which a SASL failure
  // has not got, and reports the connect as done: the transport then attaches its receiver link on
  // the closed connection and register() rejects with the NotConnectedError of that attach, with
  // no message (a connection the server drops gives NotConnectedError 'rhea: connection
  // disconnected' and no recorded SASL failure; one that never answers times out).
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: wrong key for an enrolled ID is refused at SASL (outcome auth), the right key registers`, async () => {
      const id = `${run}-${name}-wrong`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
      });
      const t0 = Date.now();
      const wrong = registerKey(id, crypto.randomBytes(32).toString('base64'), undefined, Transport);
      await rejects(
        wrong.done,
        (err) => {
          eq(err && err.name, 'NotConnectedError', `the SDK's error (${err && err.stack}; ${trace(wrong.seen)})`);
          eq(saslErrors(wrong.seen), [['ConnectionError', 'Failed to authenticate: 1', 'amqp:unauthorized-access']], `rhea's record of sasl-outcome auth (${trace(wrong.seen)})`);
          assert(wrong.seen.answers.every((a) => a.error), `no request got an answer: ${trace(wrong.seen)}`);
        },
        'wrong key'
      );
      const took = Date.now() - t0;
      assert(took < 10000, `refused in ${took} ms`);
      const r = await registered(registerKey(id, e.attestation.symmetricKey.primaryKey, undefined, Transport));
      eq(r.status, 'assigned', 'the enrollment registers with its own key');
      await service.deleteIndividualEnrollment(id);
    });
  }

  // A disabled enrollment: authenticated, then an accepted answer with status `disabled`
  // (protocol.md §5.5). The transport hands the parsed body to the polling state machine, which
  // knows assigned/assigning/failed/registering; any other status ends the register with a
  // SyntaxError `status is <status>` carrying the result (the same as the HTTPS TPM case).
  for (const [name, Transport] of TRANSPORTS) {
    await test(`device ${name}: disabled enrollment is reported (status disabled)`, async () => {
      const id = `${run}-${name}-off`;
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
        provisioningStatus: 'disabled',
      });
      const reg = registerKey(id, e.attestation.symmetricKey.primaryKey, undefined, Transport);
      await rejects(
        reg.done,
        (err) => {
          eq(`${err.name}: ${err.message}`, 'SyntaxError: status is disabled', `client error (${trace(reg.seen)})`);
          eq(err.result && err.result.status, 'disabled', 'result.status');
        },
        'disabled'
      );
      checkAnswers(reg.seen);
      await service.deleteIndividualEnrollment(id);
    });
  }

  // The Python suite (after this one) brings its own X.509 group: this one would match its members.
  await test('service: the X.509 group is deleted', async () => {
    await service.deleteEnrollmentGroup(x509Group);
    await rejects(service.getEnrollmentGroup(x509Group), (e) => eq(statusOf(e), 404, 'status'), 'X.509 group deleted');
  });

  console.log(`# amqp: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`amqp: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  console.log(`not ok - amqp: suite crashed: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
