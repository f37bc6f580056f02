#!/usr/bin/env python3
"""The last hop of the booted test system: a small SMTP server that accepts every message and
writes each one to DIR/<n>.json ({"mail": ..., "rcpts": [...], "data": ...}).

    smtp_sink.py HOST PORT DIR

Postfix's relayhost points here, so mail that restrictpd let through ends up in DIR and
nothing leaves the machine. Written here rather than smtp-sink(1) so that the envelope is
recorded as data the test can read."""

import json
import os
import socketserver
import sys
import threading

counter = 0
lock = threading.Lock()


class Handler(socketserver.StreamRequestHandler):
    def say(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.say("220 sink ESMTP")
        mail, rcpts = None, []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd[:4].upper()
            if verb == "EHLO":
                self.say("250-sink\r\n250-8BITMIME\r\n250 PIPELINING")
            elif verb == "HELO":
                self.say("250 sink")
            elif verb == "MAIL":
                mail, rcpts = cmd.split(":", 1)[1].strip(), []
                self.say("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(cmd.split(":", 1)[1].strip())
                self.say("250 2.1.5 Ok")
            elif verb == "DATA":
                self.say("354 End data with <CR><LF>.<CR><LF>")
                data = []
                while True:
                    raw = self.rfile.readline()
                    if not raw or raw in (b".\r\n", b".\n"):
                        break
                    data.append(raw[1:] if raw.startswith(b"..") else raw)
                self.store(mail, rcpts, b"".join(data).decode("utf-8", "replace"))
                self.say("250 2.0.0 Ok: stored")
                mail, rcpts = None, []
            elif verb == "QUIT":
                self.say("221 2.0.0 Bye")
                return
            else:
                self.say("250 Ok")

    def store(self, mail, rcpts, data):
        global counter
        with lock:
            counter += 1
            n = counter
        path = os.path.join(self.server.directory, f"{n:05d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"mail": mail, "rcpts": rcpts, "data": data}, f)
        os.rename(path + ".tmp", path)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    host, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(directory, exist_ok=True)
    server = Server((host, port), Handler)
    server.directory = directory
    server.serve_forever()


if __name__ == "__main__":
    main()
