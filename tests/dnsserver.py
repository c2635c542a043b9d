"""A DNS server on loopback for tests: the stand-in for the world's DNS.

Answers UDP and TCP queries from an in-memory zone that tests edit while it runs:
    dns = DnsServer(); dns.start()
    dns.add("example.test", "MX", "10 mx.example.test.")
    dns.add("mx.example.test", "A", "127.0.0.1")
    dns.set_rcode("broken.test", "SERVFAIL")
Names without records (and no rcode set) answer NXDOMAIN; a name with records of other types
answers NOERROR with an empty answer (NODATA).
"""
from __future__ import annotations

import socketserver
import struct
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.records: dict[tuple[dns.name.Name, int], list[str]] = {}
        self.rcodes: dict[dns.name.Name, int] = {}
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._udp = self._tcp = None

    # -- zone editing ------------------------------------------------------------------------
    def add(self, name: str, rdtype: str, *values: str, ttl: int = 60) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        with self.lock:
            self.records.setdefault(key, []).extend(values)

    def set(self, name: str, rdtype: str, *values: str) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        with self.lock:
            self.records[key] = list(values)

    def set_rcode(self, name: str, rcode: str) -> None:
        with self.lock:
            self.rcodes[dns.name.from_text(name)] = dns.rcode.from_text(rcode)

    def clear(self) -> None:
        with self.lock:
            self.records.clear()
            self.rcodes.clear()

    # -- answering ---------------------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage in: no answer, like a real server might
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        with self.lock:
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
            rcode = self.rcodes.get(q.name)
            values = list(self.records.get((q.name, q.rdtype), []))
            exists = any(name == q.name for name, _ in self.records)
        if rcode is not None:
            response.set_rcode(rcode)
        elif values:
            rrset = dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN, q.rdtype, values)
            response.answer.append(rrset)
        elif not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                reply = server.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self):
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    (length,) = struct.unpack("!H", head)
                    reply = server.answer(self.rfile.read(length))
                    if reply is None:
                        return
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)

        class UdpServer(socketserver.ThreadingUDPServer):
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        # Bind UDP on a free port, then TCP on the same number (retry if it is taken).
        for _ in range(20):
            udp = UdpServer((self.host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = TcpServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port pair for the test DNS server")
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv in (udp, tcp):
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return port

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
