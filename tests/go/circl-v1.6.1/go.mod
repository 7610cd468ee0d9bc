module spike.test/vectors/circl-v1.6.1

go 1.25.5

require (
	github.com/cloudflare/circl v1.6.2
	github.com/spiffe/spike-sdk-go v0.19.9
)

require (
	github.com/bwesterb/go-ristretto v1.2.3 // indirect
	golang.org/x/crypto v0.45.0 // indirect
	golang.org/x/sys v0.38.0 // indirect
)

// SPIKE <= v0.8.0 was built with circl v1.6.1. spike-sdk-go v0.19.9 asks for
// v1.6.2, so minimal version selection alone would never pick v1.6.1.
replace github.com/cloudflare/circl => github.com/cloudflare/circl v1.6.1
