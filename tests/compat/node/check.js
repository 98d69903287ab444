// Assertions shared by the Node compat suites (suite.js, tpm.js).
'use strict';

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}
// Deep equality; object key order does not matter (JSON objects are unordered).
function eq(a, b, msg) {
  if (!require('util').isDeepStrictEqual(a, b)) {
    throw new Error(`${msg}: expected ${JSON.stringify(b)}, got ${JSON.stringify(a)}`);
  }
}
async function rejects(promise, check, msg) {
  try {
    await promise;
  } catch (e) {
    check(e);
    return;
  }
  throw new Error(`${msg}: expected an error, got success`);
}
// The HTTP status an SDK error carries, wherever the SDK put it.
function statusOf(e) {
  return (e.response && e.response.statusCode) || (e.responseBody && e.responseBody.statusCode) || e.statusCode;
}

module.exports = { assert, eq, rejects, statusOf };
