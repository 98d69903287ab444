// A custom allocation webhook for the compatibility suite: picks the last linked hub and
// returns the device's payload inside its own, plus an initial twin.
'use strict';
const http = require('http');
const port = Number(process.env.WEBHOOK_PORT || 8080);
http
  .createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      let request;
      try {
        request = JSON.parse(body);
      } catch (e) {
        res.writeHead(400).end('request is not JSON');
        return;
      }
      const hubs = request.linkedHubs || [];
      const ctx = request.deviceRuntimeContext || {};
      const answer = {
        iotHubHostName: hubs[hubs.length - 1],
        initialTwin: { tags: { allocatedBy: 'compat-webhook' } },
        payload: { echo: ctx.payload || null, group: (request.enrollmentGroup || {}).enrollmentGroupId || null },
      };
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
    });
  })
  .listen(port, '127.0.0.1', () => console.log(`webhook listening on ${port}`));
