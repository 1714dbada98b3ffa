// A Node.js HTTP server for handoff's server matrix: no npm packages, Node >= 18.
//
// It answers like tests/integration/apps/versioned_app.py: VERSION_FILE is read once at
// start, every response carries X-Handoff-Generation and X-Handoff-Version and a JSON body.
//
// The socket: `--fd N` on the command line (handoff's `{fd}` placeholder), else the
// systemd convention (LISTEN_FDS / LISTEN_PID: the first socket is fd 3).
//
// The drain on SIGTERM (DRAIN in the environment):
//   graceful (default)  stop accepting, keep idle keep-alive connections open and answer
//                       the next request on each with `Connection: close`; connections
//                       still silent after DRAIN_GRACE_MS are closed; exit when none is left.
//   plain               `server.close()` only, as most Node apps do. Since Node 19 that
//                       also destroys every idle keep-alive connection at once
//                       (closeIdleConnections()), which races with requests clients are
//                       sending on them.
"use strict";

const fs = require("node:fs");
const http = require("node:http");
const net = require("node:net");

const VERSION = fs.readFileSync(process.env.VERSION_FILE, "utf8").trim();
const GENERATION = process.env.HANDOFF_GENERATION || "?";
const DRAIN = process.env.DRAIN || "graceful";
const DRAIN_GRACE_MS = Number(process.env.DRAIN_GRACE_MS || 10000);

function listenFd() {
  const flag = process.argv.indexOf("--fd");
  if (flag !== -1) return Number(process.argv[flag + 1]);
  if (process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1) {
    return 3;
  }
  throw new Error("no socket: pass --fd N or start me with LISTEN_FDS/LISTEN_PID (handoff run)");
}

let draining = false;
const body = JSON.stringify({ version: VERSION, generation: GENERATION, pid: process.pid });

const server = http.createServer((req, res) => {
  const headers = {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
    "X-Handoff-Generation": GENERATION,
    "X-Handoff-Version": VERSION,
  };
  // Node sends `Connection: close` and closes the socket after this response.
  if (draining) headers.Connection = "close";
  res.writeHead(200, headers);
  res.end(body);
});

function exitWhenClosed() {
  server.getConnections((err, count) => {
    if (!err && count === 0) process.exit(0);
  });
}

process.on("SIGTERM", () => {
  if (draining) return;
  draining = true;
  if (DRAIN === "plain") {
    server.close(() => process.exit(0));
    return;
  }
  // net.Server's close(): stop listening (this process's copy of the socket only), without
  // http.Server.close()'s closeIdleConnections(). The callback runs once every connection
  // has ended.
  net.Server.prototype.close.call(server, () => process.exit(0));
  exitWhenClosed();
  setTimeout(() => {
    // Clients that stayed silent for the whole grace: close what is idle now, then wait for
    // the requests in flight.
    server.closeIdleConnections();
    setInterval(() => server.closeIdleConnections(), 100).unref();
  }, DRAIN_GRACE_MS).unref();
});

// Node calls listen() again on the fd, which sets the backlog for every process sharing the
// socket; its default is 511. For an fd Node takes the backlog only from the second argument
// (not from options.backlog): ask for the most, the kernel caps it at net.core.somaxconn.
server.listen({ fd: listenFd() }, 65535);
