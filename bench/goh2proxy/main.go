// The HTTP/2 peer for bench/h2.py: Go's httputil.ReverseProxy with golang.org/x/net/http2,
// h2c on the listener and h2c (prior knowledge) to the upstream, injecting the same
// Authorization header as idtoken-proxy. With -serve it is the upstream instead: an h2c
// server answering every request with -size bytes (and a gRPC-shaped answer for
// application/grpc requests).
package main

import (
	"crypto/tls"
	"flag"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := flag.String("upstream", "", "upstream base URL (http://host:port), h2c")
	serve := flag.Bool("serve", false, "be the upstream: answer -size bytes")
	size := flag.Int("size", 100, "response size in -serve mode")
	flag.Parse()

	var handler http.Handler
	if *serve {
		body := []byte(strings.Repeat("x", *size))
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
				w.Header().Set("Content-Type", "application/grpc")
				w.Header().Set("Trailer", "Grpc-Status")
				n := len(body)
				if n > 255 {
					n = 255
				}
				msg := append([]byte{0, 0, 0, 0, byte(n)}, body[:n]...)
				w.Write(msg)
				w.Header().Set("Grpc-Status", "0")
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			w.Write(body)
		})
	} else {
		target, err := url.Parse(*upstream)
		if err != nil || *upstream == "" {
			log.Fatalf("-upstream: %v", err)
		}
		token := os.Getenv("BENCH_TOKEN")
		proxy := httputil.NewSingleHostReverseProxy(target)
		director := proxy.Director
		proxy.Director = func(r *http.Request) {
			director(r)
			r.Host = target.Host
			r.Header.Set("Authorization", "Bearer "+token)
		}
		proxy.Transport = &http2.Transport{
			AllowHTTP: true,
			DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) {
				return net.Dial(network, addr)
			},
		}
		handler = proxy
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	// The port goes to stdout so that the bench can find it.
	os.Stdout.WriteString(ln.Addr().String() + "\n")
	srv := &http.Server{Handler: h2c.NewHandler(handler, &http2.Server{MaxConcurrentStreams: 1000})}
	log.Fatal(srv.Serve(ln))
}
