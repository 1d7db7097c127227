// The HTTP/2 peer for bench/h2.py: Go's httputil.ReverseProxy with golang.org/x/net/http2,
// h2c on the listener and h2c (prior knowledge) to the upstream, injecting the same
// Authorization header as idtoken-proxy (the token from BENCH_ID_TOKEN). With -serve it is
// the upstream instead: an h2c server answering every request with -size bytes, and a
// gRPC-shaped answer (one length-prefixed message, grpc-status 0) for application/grpc
// requests.
//
// Built by bench/h2.py with Debian's golang-go and golang-golang-x-net-dev, no modules:
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build
//
// The upstream (-serve) also has what the memory case needs:
//
//	/slow, /test.Echo/Wait  held open until /bench/release (or the client cancels, or -hold)
//	/bench/open             how many requests are held open now (text)
//	/bench/release          lets every held request answer
//
// With BENCH_ID_TOKEN set, the upstream answers 401 (gRPC: UNAUTHENTICATED) to a request
// without "Authorization: Bearer <token>", so every success in the bench shows the proxy
// under test injected the token.
package main

import (
	"crypto/tls"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// held counts the requests waiting on the release channel, which /bench/release closes.
type held struct {
	open    atomic.Int64
	mu      sync.Mutex
	release chan struct{}
}

func (h *held) wait(r *http.Request, limit time.Duration) {
	h.mu.Lock()
	ch := h.release
	h.mu.Unlock()
	h.open.Add(1)
	defer h.open.Add(-1)
	select {
	case <-ch:
	case <-r.Context().Done():
	case <-time.After(limit):
	}
}

func (h *held) releaseAll() {
	h.mu.Lock()
	close(h.release)
	h.release = make(chan struct{})
	h.mu.Unlock()
}

func upstreamHandler(size int, hold time.Duration) http.Handler {
	body := []byte(strings.Repeat("x", size))
	// One gRPC message: the 5-byte prefix (not compressed, big-endian length), then the bytes.
	n := len(body)
	grpcMsg := append([]byte{0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, body...)
	want := ""
	if token := os.Getenv("BENCH_ID_TOKEN"); token != "" {
		want = "Bearer " + token
	}
	h := &held{release: make(chan struct{})}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/bench/open":
			w.Write([]byte(strconv.FormatInt(h.open.Load(), 10)))
			return
		case "/bench/release":
			h.releaseAll()
			w.Write([]byte("released"))
			return
		}
		// Read the request to its end first, as a real service does: an unread body makes
		// the server reset the stream, which a gRPC client reports as an error.
		io.Copy(io.Discard, r.Body)
		grpc := strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
		if want != "" && r.Header.Get("Authorization") != want {
			if grpc {
				w.Header().Set("Content-Type", "application/grpc")
				w.Header().Set("Grpc-Status", "16")
				w.Header().Set("Grpc-Message", "no%20or%20wrong%20token")
				w.WriteHeader(http.StatusOK)
				return
			}
			http.Error(w, "no or wrong token", http.StatusUnauthorized)
			return
		}
		if r.URL.Path == "/slow" || r.URL.Path == "/test.Echo/Wait" {
			h.wait(r, hold)
		}
		if grpc {
			w.Header().Set("Content-Type", "application/grpc")
			w.Header().Set("Trailer", "Grpc-Status")
			w.Write(grpcMsg)
			w.Header().Set("Grpc-Status", "0")
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
}

func peerHandler(upstream string) http.Handler {
	target, err := url.Parse(upstream)
	if err != nil || target.Host == "" {
		log.Fatalf("goh2proxy: -upstream must be a URL, got %q", upstream)
	}
	token := os.Getenv("BENCH_ID_TOKEN")
	if token == "" {
		log.Fatal("goh2proxy: BENCH_ID_TOKEN is empty")
	}
	authorization := "Bearer " + token
	proxy := httputil.NewSingleHostReverseProxy(target)
	director := proxy.Director
	proxy.Director = func(r *http.Request) {
		director(r)
		// As idtoken-proxy does: the upstream's own authority, and the token header.
		r.Host = target.Host
		r.Header.Set("Authorization", authorization)
	}
	// h2c to the upstream: an http:// URL with HTTP/2 prior knowledge, over a plain TCP dial.
	proxy.Transport = &http2.Transport{
		AllowHTTP: true,
		DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) {
			return net.Dial(network, addr)
		},
	}
	return proxy
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := flag.String("upstream", "", "upstream base URL (http://host:port), h2c")
	serve := flag.Bool("serve", false, "be the upstream: answer -size bytes")
	size := flag.Int("size", 100, "response size in -serve mode")
	hold := flag.Duration("hold", 60*time.Second, "longest a /slow request is held in -serve mode")
	flag.Parse()

	var handler http.Handler
	if *serve {
		handler = upstreamHandler(*size, *hold)
	} else {
		handler = peerHandler(*upstream)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	// The address goes to stdout so that the bench can find the port of -listen 127.0.0.1:0.
	os.Stdout.WriteString(ln.Addr().String() + "\n")
	// h2c with prior knowledge (and HTTP/1.1, which the bench uses for /bench/open).
	srv := &http.Server{Handler: h2c.NewHandler(handler, &http2.Server{MaxConcurrentStreams: 1000})}
	log.Fatal(srv.Serve(ln))
}
