// The over-the-wire benchmark's independent reference: a pion/dtls (Go) echo server.
//
//	wire_pion PORT CERT KEY LIFETIME
//
// DTLS 1.2 on 127.0.0.1:PORT (0: any), the PEM certificate and key the
// benchmark writes (ECDSA P-256), TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
// only, no client certificate, HelloVerifyRequest cookies on (pion's
// default, like the C server's DTLSv1_listen), the extended master secret
// required (libssl's client always offers it), MTU 1200 like the load
// generator. Built the way pion's users build a server: pion/udp's listener
// (one socket, one reader goroutine that hands each peer's datagrams to its
// connection), then one goroutine per accepted peer that does the handshake
// and writes back every record it reads. Prints "port=<n>" once bound and
// exits after LIFETIME seconds at most.
//
// Built by wire.py against Debian's pion sources (golang-github-pion-dtls.v2-dev)
// in GOPATH mode, offline; nothing here is needed by the tests.
package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/pion/dtls/v2"
	"github.com/pion/udp/v2"
)

// rcvbuf matches the Python servers' receive buffer: 500 peers' requests at
// once overflow Linux's default of 208 KiB on a single shared socket.
const rcvbuf = 4 << 20

// contentTypeHandshake is the record type that may open a new association;
// anything else from an unknown address is dropped before a Conn exists.
const contentTypeHandshake = 22

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "wire_pion: %s: %v\n", what, err)
	os.Exit(1)
}

// widenReceiveBuffers sets SO_RCVBUF on the process's UDP sockets: pion/udp
// opens its socket itself and offers no hook, and it is the only one here.
func widenReceiveBuffers() {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		kind, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TYPE)
		if err == nil && kind == syscall.SOCK_DGRAM {
			_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
		}
	}
}

// echo completes one peer's handshake, then writes back each record read
// until the peer closes or errs (no per-read deadline: the process's lifetime
// bounds it, and a timer reset per record would be charged to pion).
func echo(raw net.Conn, config *dtls.Config) {
	conn, err := dtls.Server(raw, config)
	if err != nil {
		_ = raw.Close()
		return
	}
	defer conn.Close()
	buf := make([]byte, 16384)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			return
		}
	}
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: wire_pion PORT CERT KEY LIFETIME")
		os.Exit(2)
	}
	port, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fail("port", err)
	}
	lifetime, err := strconv.ParseFloat(os.Args[4], 64)
	if err != nil {
		fail("lifetime", err)
	}
	time.AfterFunc(time.Duration(lifetime*float64(time.Second)), func() { os.Exit(0) })
	certificate, err := tls.LoadX509KeyPair(os.Args[2], os.Args[3])
	if err != nil {
		fail("certificate", err)
	}
	config := &dtls.Config{
		Certificates:         []tls.Certificate{certificate},
		CipherSuites:         []dtls.CipherSuiteID{dtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
		ClientAuth:           dtls.NoClientCert,
		ExtendedMasterSecret: dtls.RequireExtendedMasterSecret,
		MTU:                  1200,
	}
	accept := udp.ListenConfig{
		Backlog:      512, // the load generator opens 32 at a time; room for retransmitted hellos
		AcceptFilter: func(p []byte) bool { return len(p) > 0 && p[0] == contentTypeHandshake },
	}
	listener, err := accept.Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		fail("listen", err)
	}
	widenReceiveBuffers()
	fmt.Printf("port=%d\n", listener.Addr().(*net.UDPAddr).Port)
	for {
		raw, err := listener.Accept()
		if err != nil {
			fail("accept", err)
		}
		go echo(raw, config)
	}
}
