// Command circl-v1.6.3 prints Shamir shard vectors exactly as SPIKE main
// computes them: spike-sdk-go v0.19.9's crypto.ComputeShares (SPIKE main's
// pin) over Cloudflare circl v1.6.3 (SPIKE main's pin) secretsharing over
// group.P256.
//
// From circl v1.6.2 on, group.P256's RandomScalar is Go's
// crypto/rand.Int(reader, n): it reads one 32-byte block, takes it big-endian
// and accepts it if it is below n, otherwise reads the next block (rejection
// sampling).
//
// Every accepted case is computed twice: by the SDK's own ComputeShares and by
// the step-by-step copy below; the program fails if they differ.
//
// Regenerate (from the repository root):
//
//	cd tests/go/circl-v1.6.3 && go run . > ../../vectors/shamir-circl-v1.6.3.json
//
// This program is spike's own test-vector generator, not SPIKE code. It is the
// same text as tests/go/circl-v1.6.1/main.go apart from this comment and the
// constants below.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"os"
	"runtime/debug"
	"strconv"

	"github.com/cloudflare/circl/group"
	"github.com/cloudflare/circl/secretsharing"
	"github.com/spiffe/spike-sdk-go/config/env"
	sdkcrypto "github.com/spiffe/spike-sdk-go/crypto"
)

// What differs between tests/go/circl-v1.6.1 and tests/go/circl-v1.6.3.
const (
	derivation = "rejection_sampling"
	generator  = "tests/go/circl-v1.6.3"
	wantCircl  = "v1.6.3"
)

// computeShares mirrors SPIKE v0.8.0's computeShares for one root key, with
// SPIKE's SHAMIR_THRESHOLD/SHAMIR_SHARES passed in instead of read from the
// environment, and errors returned instead of log.FatalErr.
func computeShares(rk [32]byte, threshold, shares int) ([]secretsharing.Share, error) {
	if rk == [32]byte{} {
		return nil, fmt.Errorf("root key is zero (SPIKE: ErrRootKeyEmpty)")
	}
	g := group.P256
	t := uint(threshold - 1)
	n := uint(shares)
	rootSecret := g.NewScalar()
	if err := rootSecret.UnmarshalBinary(rk[:]); err != nil {
		return nil, fmt.Errorf("UnmarshalBinary: %v", err)
	}
	reader := sdkcrypto.NewDeterministicReader(rk[:])
	ss := secretsharing.New(reader, t, rootSecret)
	out := ss.Share(n)
	// SPIKE's VerifyShamirReconstruction: the first `threshold` shares must
	// give back the secret, compared as scalars (bytes).
	rec, err := secretsharing.Recover(t, out[:threshold])
	if err != nil {
		return nil, fmt.Errorf("Recover: %v", err)
	}
	if !rootSecret.IsEqual(rec) {
		return nil, fmt.Errorf("reconstructed secret does not match (SPIKE: ErrShamirReconstructionFailed)")
	}
	return out, nil
}

// sdkComputeShares runs spike-sdk-go's own crypto.ComputeShares, which reads
// the Shamir parameters from SPIKE's environment variables and exits the
// process on any failure, so it is only called for keys SPIKE accepts.
func sdkComputeShares(rk [32]byte, threshold, shares int) []secretsharing.Share {
	must(os.Setenv(env.NexusShamirThreshold, strconv.Itoa(threshold)))
	must(os.Setenv(env.NexusShamirShares, strconv.Itoa(shares)))
	key := rk
	_, out := sdkcrypto.ComputeShares(&key)
	return out
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// chainReader is SPIKE's deterministic reader started from an arbitrary first
// block b0 instead of SHA-256(seed): b0 || SHA-256(b0) || ...
type chainReader struct {
	block []byte
	pos   int
}

func (r *chainReader) Read(p []byte) (int, error) {
	if r.pos >= len(r.block) {
		h := sha256.Sum256(r.block)
		r.block = h[:]
		r.pos = 0
	}
	n := copy(p, r.block[r.pos:])
	r.pos += n
	return n, nil
}

type shard struct {
	Index int    `json:"index"`
	Value string `json:"value"`
}

type shareCase struct {
	Name      string  `json:"name"`
	Key       string  `json:"key"`
	Threshold int     `json:"threshold"`
	Shares    int     `json:"shares"`
	Shards    []shard `json:"shards"`
}

type rejectedKey struct {
	Name   string `json:"name"`
	Key    string `json:"key"`
	Reason string `json:"reason"`
}

type streamCase struct {
	B0           string   `json:"b0"`
	Coefficients []string `json:"coefficients"`
}

type output struct {
	Description  string        `json:"description"`
	Derivation   string        `json:"derivation"`
	Circl        string        `json:"circl"`
	SpikeSDKGo   string        `json:"spike_sdk_go"`
	OrderN       string        `json:"order_n"`
	Cases        []shareCase   `json:"cases"`
	RejectedKeys []rejectedKey `json:"rejected_keys"`
	StreamCases  []streamCase  `json:"stream_cases"`
}

var orderN, _ = new(big.Int).SetString("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", 16)

func be32(v *big.Int) [32]byte {
	var b [32]byte
	v.FillBytes(b[:])
	return b
}

func fromHex(s string) [32]byte {
	var b [32]byte
	raw, err := hex.DecodeString(s)
	if err != nil || len(raw) != 32 {
		panic("bad hex constant " + s)
	}
	copy(b[:], raw)
	return b
}

func bigSub(a *big.Int, d int64) *big.Int { return new(big.Int).Sub(a, big.NewInt(d)) }
func bigAdd(a *big.Int, d int64) *big.Int { return new(big.Int).Add(a, big.NewInt(d)) }

type namedKey struct {
	name string
	key  [32]byte
}

// Keys every case is computed for. Random-looking keys are SHA-256 of a label
// so the file is reproducible.
func keys() []namedKey {
	return []namedKey{
		{"one", be32(big.NewInt(1))},
		{"two", be32(big.NewInt(2))},
		{"small-0x0100", be32(big.NewInt(0x100))},
		{"n-minus-1", be32(bigSub(orderN, 1))},
		{"n-minus-2", be32(bigSub(orderN, 2))},
		{"2^255", fromHex("8000000000000000000000000000000000000000000000000000000000000000")},
		{"high-bytes", fromHex("fffffffeabababababababababababababababababababababababababababab")},
		{"random-1", sha256.Sum256([]byte("spike compat key 1"))},
		{"random-2", sha256.Sum256([]byte("spike compat key 2"))},
		{"random-3", sha256.Sum256([]byte("spike compat key 3"))},
	}
}

// Keys SPIKE refuses to share: zero, and values not below n.
func rejected() []namedKey {
	return []namedKey{
		{"zero", [32]byte{}},
		{"n", be32(orderN)},
		{"n-plus-1", be32(bigAdd(orderN, 1))},
		{"all-ff", fromHex("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff")},
	}
}

// (threshold, shares) pairs; SPIKE's default is 2 of 3.
var params = [][2]int{{1, 1}, {2, 3}, {3, 5}, {4, 7}, {5, 5}, {1, 4}, {10, 16}}

func moduleVersion(path string) string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, d := range info.Deps {
		if d.Path == path {
			if d.Replace != nil {
				return d.Replace.Version
			}
			return d.Version
		}
	}
	return "unknown"
}

func marshal32(s group.Scalar) string {
	b, err := s.MarshalBinary()
	if err != nil || len(b) != 32 {
		panic(fmt.Sprintf("MarshalBinary: %v (len %d)", err, len(b)))
	}
	return hex.EncodeToString(b)
}

func main() {
	circl := moduleVersion("github.com/cloudflare/circl")
	if circl != wantCircl {
		fail("built with circl %s, want %s", circl, wantCircl)
	}
	// The SDK's reader is the chain SHA-256(seed), SHA-256 of that, ...
	seed := []byte("reader check")
	first := sha256.Sum256(seed)
	mine, sdks := make([]byte, 4096), make([]byte, 4096)
	mustRead(&chainReader{block: first[:]}, mine)
	mustRead(sdkcrypto.NewDeterministicReader(seed), sdks)
	if string(mine) != string(sdks) {
		fail("chainReader differs from spike-sdk-go NewDeterministicReader")
	}

	out := output{
		Description: "Keeper shards as SPIKE computes them with circl " + circl +
			" (spike-sdk-go crypto.ComputeShares: NewDeterministicReader(root key) + circl secretsharing over group.P256); generated by " + generator,
		Derivation: derivation,
		Circl:      circl,
		SpikeSDKGo: moduleVersion("github.com/spiffe/spike-sdk-go"),
		OrderN:     hex.EncodeToString(orderN.Bytes()),
	}
	for _, k := range keys() {
		for _, p := range params {
			t, n := p[0], p[1]
			shares, err := computeShares(k.key, t, n)
			if err != nil {
				fail("%s t=%d n=%d: %v", k.name, t, n, err)
			}
			viaSDK := sdkComputeShares(k.key, t, n)
			if len(viaSDK) != len(shares) {
				fail("%s t=%d n=%d: SDK gave %d shares", k.name, t, n, len(viaSDK))
			}
			c := shareCase{
				Name:      fmt.Sprintf("%s t=%d n=%d", k.name, t, n),
				Key:       hex.EncodeToString(k.key[:]),
				Threshold: t,
				Shares:    n,
			}
			for i, s := range shares {
				id := group.P256.NewScalar().SetUint64(uint64(i + 1))
				if !s.ID.IsEqual(id) || !viaSDK[i].ID.IsEqual(id) {
					fail("%s: share IDs are not 1..n", c.Name)
				}
				v := marshal32(s.Value)
				if marshal32(viaSDK[i].Value) != v {
					fail("%s: shard %d differs from spike-sdk-go ComputeShares", c.Name, i+1)
				}
				c.Shards = append(c.Shards, shard{Index: i + 1, Value: v})
			}
			out.Cases = append(out.Cases, c)
		}
	}
	for _, k := range rejected() {
		// Refused under every (threshold, shares); the reason recorded is
		// the one for SPIKE's default 2 of 3.
		for _, p := range params {
			if _, err := computeShares(k.key, p[0], p[1]); err == nil {
				fail("%s t=%d n=%d: expected SPIKE to refuse this key", k.name, p[0], p[1])
			}
		}
		_, err := computeShares(k.key, 2, 3)
		out.RejectedKeys = append(out.RejectedKeys, rejectedKey{Name: k.name, Key: hex.EncodeToString(k.key[:]), Reason: err.Error()})
	}
	for _, b0 := range [][32]byte{
		be32(orderN),
		fromHex("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
		be32(bigSub(orderN, 1)),
		{},
		sha256.Sum256([]byte("stream")),
	} {
		r := &chainReader{block: append([]byte(nil), b0[:]...)}
		sc := streamCase{B0: hex.EncodeToString(b0[:])}
		for range 3 {
			sc.Coefficients = append(sc.Coefficients, marshal32(group.P256.RandomScalar(r)))
		}
		out.StreamCases = append(out.StreamCases, sc)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	must(enc.Encode(out))
}

func mustRead(r io.Reader, b []byte) {
	if _, err := io.ReadFull(r, b); err != nil {
		panic(err)
	}
}
