// Square [-1, 1]^2, unstructured (use as [actions] domain = "meshes/rectangle_<resolution>.xdmf";
// the built-in domain = "rectangle" is DOLFINx's structured crossed-diagonal mesh of actions.lower/upper).
// Regenerate the XDMF meshes with `make meshes`; h is the target edge length (set by meshes/generate.py).
DefineConstant[ h = {0.1, Name "h"} ];
Point(1) = {-1, -1, 0, h};
Point(2) = {1, -1, 0, h};
Point(3) = {1, 1, 0, h};
Point(4) = {-1, 1, 0, h};
Line(1) = {1, 2};
Line(2) = {2, 3};
Line(3) = {3, 4};
Line(4) = {4, 1};
Curve Loop(1) = {1, 2, 3, 4};
Plane Surface(1) = {1};
Physical Surface(1) = {1};
Mesh.Algorithm = 5;  // Delaunay
