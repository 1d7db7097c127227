// A Go stdlib reverse proxy for the benchmark: the peer idtoken-proxy is measured against.
//
//	goproxy -listen 127.0.0.1:PORT -upstream http://127.0.0.1:UPSTREAM
//
// It sets the same "Authorization: Bearer <token>" header idtoken-proxy injects (the token
// from BENCH_ID_TOKEN), and keeps up to 100 idle upstream connections per host: Go's
// default of 2 would make it open a new connection for most requests at 64 connections.
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	upstream := flag.String("upstream", "", "upstream URL")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil || target.Host == "" {
		log.Fatalf("goproxy: -upstream must be a URL, got %q", *upstream)
	}
	token := os.Getenv("BENCH_ID_TOKEN")
	if token == "" {
		log.Fatal("goproxy: BENCH_ID_TOKEN is empty")
	}
	authorization := "Bearer " + token

	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = 1000
	transport.MaxIdleConnsPerHost = 100
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = transport
	director := proxy.Director
	proxy.Director = func(r *http.Request) {
		director(r)
		// As idtoken-proxy does: the upstream's own Host, and the token header.
		r.Host = target.Host
		r.Header.Set("Authorization", authorization)
	}
	log.Printf("goproxy: listening on http://%s -> %s", *listen, target)
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
