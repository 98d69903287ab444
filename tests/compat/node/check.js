// Assertions and deadlines shared by the Node compat suites (suite.js, tpm.js, amqp.js).
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

// No SDK call has a deadline of its own that always fires, and a promise that never settles ends
// node with exit code 0 in the middle of a suite: the suites race every SDK call against a
// deadline of `ms` milliseconds.
function within(promise, what, ms) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms / 1000} s: ${what}`)), ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}
// A service client (or one of its queries) whose every promise is raced by within().
function timed(target, what, ms) {
  return new Proxy(target, {
    get(t, prop) {
      const value = Reflect.get(t, prop, t);
      if (typeof value !== 'function') return value;
      return (...args) => {
        const r = value.apply(t, args);
        if (r && typeof r.then === 'function') return within(r, `${what}.${String(prop)}`, ms);
        if (r && typeof r === 'object' && 'hasMoreResults' in r) return timed(r, `${what}.${String(prop)}()`, ms);
        return r;
      };
    },
  });
}

module.exports = { assert, eq, rejects, statusOf, within, timed };
