module idtoken-proxy/bench/goproxy

go 1.19
